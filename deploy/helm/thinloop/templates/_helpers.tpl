{{/* Labels every object carries. */}}
{{- define "thinloop.labels" -}}
app.kubernetes.io/name: thinloop
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Host directory holding the driver's socket. */}}
{{- define "thinloop.pluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{/* repository:tag of one entry of .Values.images. */}}
{{- define "thinloop.image" -}}
{{ .repository }}:{{ .tag }}
{{- end -}}

{{/* Host directory holding the shared-datastore driver's socket. */}}
{{- define "thinloop.sharedPluginDir" -}}
{{ .Values.kubeletDir }}/plugins/{{ .Values.sharedDatastore.driverName }}
{{- end -}}

{{/* The shared datastore's image directory: <mountRoot>/<name>. */}}
{{- define "thinloop.sharedDataDir" -}}
{{ .Values.sharedDatastore.mountRoot }}/{{ .Values.sharedDatastore.name }}
{{- end -}}

{{/* The node label (value "mounted") by which the operator says a node mounts the datastore. */}}
{{- define "thinloop.sharedNodeLabel" -}}
datastore.thinloop.csi.io/{{ .Values.sharedDatastore.name }}
{{- end -}}
