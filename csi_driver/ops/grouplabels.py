"""Hand each VolumeGroupSnapshotContent of this driver to the node that holds its volumes.

Why this exists. With distributed snapshotting, csi-snapshotter runs in every node pod with
`--node-deployment` and watches VolumeSnapshotContents *and* VolumeGroupSnapshotContents
only through an informer restricted to the label
`snapshot.storage.kubernetes.io/managed-by=<NODE_NAME>` (external-snapshotter v8.6.0,
cmd/csi-snapshotter/main.go lines 155-162: one `snapshotContentfactory` with that label
selector feeds both the VolumeSnapshotContent informer, line 272, and the
VolumeGroupSnapshotContent one, line 285). snapshot-controller with
`--enable-distributed-snapshotting` sets that label only on the VolumeSnapshotContents it
creates (pkg/common-controller/snapshot_controller.go lines 762-771); the
VolumeGroupSnapshotContent it creates carries no label at all
(pkg/common-controller/groupsnapshot_controller_helper.go lines 1207-1219,
createGroupSnapshotContent). Its main branch (read at afb2f0d) is the same. So without
this module no node takes a new group up and the VolumeGroupSnapshot stays pending.

What it does. For every VolumeGroupSnapshotContent (groupsnapshot.storage.k8s.io/v1) whose
`spec.driver` is this driver and that has no managed-by label, it looks (stat only, never
writing) at this node's data dir and labels the content `managed-by=<this node>` when:

- dynamic (`spec.source.volumeHandles`): this node holds the volume whose id sorts first.
  When all members are here the group is taken as usual; when only some are (a group
  split across nodes), this node's driver answers FAILED_PRECONDITION naming the volumes
  that are not here, and csi-snapshotter puts that error into the VolumeGroupSnapshot's
  status: the group fails visibly instead of staying pending. Exactly one node holds the
  first volume, so exactly one node labels.
- pre-provisioned (`spec.source.groupSnapshotHandles`): the handle is the group id and the
  member handles are snapshot ids (csi_driver.volumes.grouprecords, csi_driver.volumes.store). The node
  whose `group-snapshots/<group>/` record is here labels it; when no node has the record,
  the node holding the member snapshot whose id sorts first does (its driver then answers
  GetVolumeGroupSnapshot with NOT_FOUND, which reaches the status too).

The label is applied by a merge patch that carries the `resourceVersion` the decision was
made on: the API server refuses it (409 Conflict) when the object changed meanwhile, so two
nodes can never both label one content, and a label somebody else set first is never
overwritten. A conflict is not an error: the change that caused it arrives through the
watch, and the content is judged again from that.

Layers: this module knows the data dir's layout (csi_driver.volumes.store, grouprecords) and the
Kubernetes API through one thin wrapper (GroupContents); it imports nothing of the CSI
faces or the server. Run by `thinloopctl node label-group-snapshots [--watch]`.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential_jitter

from ..volumes.grouprecords import GROUPS_DIR
from ..volumes.store import ID_RE, IMAGE, META

log = logging.getLogger("thinloop.grouplabels")

GROUP = "groupsnapshot.storage.k8s.io"
VERSION = "v1"
PLURAL = "volumegroupsnapshotcontents"
KIND = "VolumeGroupSnapshotContent"
MANAGED_BY = "snapshot.storage.kubernetes.io/managed-by"
"""external-snapshotter pkg/utils/util.go, VolumeSnapshotContentManagedByLabel."""
UNLABELLED = f"!{MANAGED_BY}"
"""Label selector: only contents that carry no managed-by label at all."""
WATCH_SECONDS = 300
"""How long the API server keeps one watch open before the labeller opens the next."""
MAX_BACKOFF_SECONDS = 30.0
SHORT_WATCH_SECONDS = 1.0
"""A watch that the server ends this soon with no event counts as failed for the backoff:
an API server or proxy that closes every watch at once must not be asked in a tight loop."""
"""Longest pause between attempts while the API server keeps failing."""
LABEL_VALUE_RE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)")
"""A Kubernetes label value (fullmatch): at most 63 characters."""

Obj = dict[str, Any]


class ApiError(Exception):
    """A Kubernetes API call failed. `status` is the HTTP status (409 Conflict, 410 Gone,
    404 Not Found, ...), or 0 when no answer came (connection refused, reset, timed out)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else f"no answer: {message}")
        self.status = status

    def explain(self) -> str:
        """The error, with what a 404 on this resource usually means."""
        hint = f" (is the {GROUP}/{VERSION} {KIND} CRD installed?)" if self.status == 404 else ""
        return f"{self}{hint}"


class Terminated(BaseException):
    """SIGTERM or SIGINT arrived. A BaseException so that no `except Exception` on the
    way (the Kubernetes client's, urllib3's) swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class GroupContents(Protocol):
    """The four things the labeller needs of the API, on cluster-scoped
    groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshotContents that carry no managed-by
    label. Objects are plain JSON dicts as the API server sends them. Every method raises
    ApiError on failure."""

    def list(self) -> tuple[list[Obj], str]:
        """The unlabelled contents and the list's resourceVersion (to watch from)."""
        ...

    def watch(self, resource_version: str) -> Iterator[tuple[str, Obj]]:
        """Events after `resource_version` as (type, object): ADDED, MODIFIED, DELETED,
        BOOKMARK (the object carries only metadata.resourceVersion). Ends when the server
        closes the watch; ApiError(410) when that version is too old to watch from."""
        ...

    def label(self, name: str, resource_version: str, key: str, value: str) -> None:
        """Set label key=value on content `name`, only if it is still at
        `resource_version`: ApiError(409) if it changed, ApiError(404) if it is gone."""
        ...


class NodeData:
    """What this node's data dir holds, seen read-only: each answer is one stat(2) of a
    path built from a checked id. Nothing is created, opened for writing or locked (the
    sidecar mounts the data dir read-only)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir

    def _is_file(self, kind: str, obj_id: str, leaf: str) -> bool:
        # An id outside the driver's alphabet ("..", "a/b") names nothing of ours.
        return bool(ID_RE.fullmatch(obj_id)) and os.path.isfile(self.data_dir / kind / obj_id / leaf)

    def has_volume(self, volume_id: str) -> bool:
        """`volumes/<id>/disk.img` is here (a hand-made image without meta.json counts,
        as it does for the driver)."""
        return self._is_file("volumes", volume_id, IMAGE)

    def has_snapshot(self, snapshot_id: str) -> bool:
        return self._is_file("snapshots", snapshot_id, IMAGE)

    def has_group(self, group_id: str) -> bool:
        """The group's committed record `group-snapshots/<id>/meta.json` is here."""
        return self._is_file(GROUPS_DIR, group_id, META)


def claim(content: Obj, driver_name: str, data: NodeData) -> str | None:
    """Why this node should label `content` (a VolumeGroupSnapshotContent as JSON), or None
    when it should not: another driver's, already labelled, or held elsewhere."""
    spec = content.get("spec") or {}
    labels = (content.get("metadata") or {}).get("labels") or {}
    if spec.get("driver") != driver_name or MANAGED_BY in labels:
        return None
    source = spec.get("source") or {}
    volumes = sorted({str(v) for v in source.get("volumeHandles") or []})
    if volumes:
        if not data.has_volume(volumes[0]):
            return None
        away = [v for v in volumes[1:] if not data.has_volume(v)]
        if not away:
            return f"its volume(s) {', '.join(volumes)} are all here"
        return (f"it holds {volumes[0]}, the first of the group's volumes by id, but not "
                f"{', '.join(away)}: the driver here refuses the group with FAILED_PRECONDITION "
                "naming them, and that error reaches the VolumeGroupSnapshot's status")
    handles = source.get("groupSnapshotHandles") or {}
    group = str(handles.get("volumeGroupSnapshotHandle") or "")
    snapshots = sorted({str(s) for s in handles.get("volumeSnapshotHandles") or []})
    if group and data.has_group(group):
        return f"the record of volume group snapshot {group} is here"
    if snapshots and data.has_snapshot(snapshots[0]):
        return (f"it holds snapshot {snapshots[0]}, the first of the group's snapshots by id "
                f"(the record of group {group or '?'} is not here)")
    return None


@dataclass(frozen=True)
class Labelled:
    """One label applied: the content's name and why this node took it."""

    name: str
    node: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"content": self.name, "node": self.node, "reason": self.reason}


def check_settings(node_name: str, driver_name: str, data_dir: Path) -> None:
    """ValueError with one line when the labeller cannot run with these settings."""
    if not node_name:
        raise ValueError("no node name: set NODE_NAME (in a pod, from the downward API's spec.nodeName) "
                         "or pass --node-name")
    if not LABEL_VALUE_RE.fullmatch(node_name):
        raise ValueError(f"node name {node_name[:80]!r} cannot be a label value (at most 63 letters, digits, "
                         "'-', '_' or '.', starting and ending with a letter or digit), so csi-snapshotter's "
                         "managed-by label cannot name it")
    if not driver_name:
        raise ValueError("no driver name: pass --driver-name or set THINLOOP_DRIVER_NAME")
    if not data_dir.is_dir():
        raise ValueError(f"data dir {data_dir} is not a directory: pass --data-dir (or THINLOOP_DATA_DIR) "
                         "with the driver's data dir")


class Labeller:
    """Labels this node's VolumeGroupSnapshotContents: once (`sweep`) or until stopped
    (`run`: list, then watch from the list's resourceVersion; list again when the watch
    expires with 410 Gone; pause with exponential backoff and jitter, up to
    MAX_BACKOFF_SECONDS, while the API fails)."""

    def __init__(self, api: GroupContents, node_name: str, driver_name: str, data: NodeData, *,
                 pause: Callable[[float], None] | None = None) -> None:
        self.api = api
        self.node_name = node_name
        self.driver_name = driver_name
        self.data = data
        self.stop = threading.Event()
        """Set to end `run` (at its next event or pause)."""
        self.labelled: list[Labelled] = []
        self._pause: Callable[[float], None] = pause or self._wait
        self._resource_version: str | None = None
        """Where the next watch starts; None: list first."""
        self._patching = False
        self._signal: int | None = None
        self._events = 0
        """Watch events seen, bookmarks included (a watch that brought none and ended at once
        is paused after, see SHORT_WATCH_SECONDS)."""

    # -- one content --------------------------------------------------------------------------

    def consider(self, content: Obj) -> Labelled | None:
        """Label `content` if it is this node's; None when it is not, or when it changed or
        went away before the label landed (not an error: its change is judged when it
        arrives). Other API errors propagate, and the next `run` round lists again so
        that the content is not forgotten."""
        reason = claim(content, self.driver_name, self.data)
        meta = content.get("metadata") or {}
        name, version = str(meta.get("name") or ""), str(meta.get("resourceVersion") or "")
        if reason is None or not name or not version:
            return None
        self._patching = True  # a SIGTERM now waits for the answer, so the log tells the truth
        try:
            try:
                self.api.label(name, version, MANAGED_BY, self.node_name)
            except ApiError as exc:
                if exc.status == 409:
                    log.info("%s %s changed before it could be labelled (another node may have labelled "
                             "it first); judged again at its next version", KIND, name)
                    return None
                if exc.status == 404:
                    log.info("%s %s is gone; nothing to label", KIND, name)
                    return None
                self._resource_version = None
                raise
            done = Labelled(name, self.node_name, reason)
            self.labelled.append(done)
            log.info("labelled %s %s %s=%s: %s", KIND, name, MANAGED_BY, self.node_name, reason)
            return done
        finally:
            self._patching = False
            self._deferred_signal()

    # -- once ----------------------------------------------------------------------------------

    def sweep(self) -> list[Labelled]:
        """List the unlabelled contents and label this node's; what was labelled."""
        items, version = self.api.list()
        done = [d for d in map(self.consider, items) if d is not None]
        self._resource_version = version
        return done

    # -- until stopped -------------------------------------------------------------------------

    def run(self) -> None:
        """Sweep, then watch, until `stop` is set. API errors never end it."""
        retrying = Retrying(
            retry=retry_if_exception_type(ApiError),
            wait=wait_exponential_jitter(initial=1, max=MAX_BACKOFF_SECONDS),
            stop=stop_when_event_set(self.stop),
            sleep=self._pause,
            before_sleep=self._log_retry,
            reraise=True,
        )
        short = 0
        while not self.stop.is_set():
            started, events = time.monotonic(), self._events
            try:
                retrying(self._round)
            except ApiError:
                if not self.stop.is_set():  # tenacity gives up only when stopped
                    raise
            if self.stop.is_set():
                break
            if self._events == events and time.monotonic() - started < SHORT_WATCH_SECONDS:
                short += 1
                wait = min(float(2 ** (short - 1)), MAX_BACKOFF_SECONDS)
                if short == 1 or short % 10 == 0:
                    log.warning("Kubernetes API: the watch ended at once with no event (%d in a row); "
                                "watching again in %.0f s", short, wait)
                self._pause(wait)
            else:
                short = 0

    def _round(self) -> None:
        """One list (when needed) and one watch, until the server ends it."""
        try:
            if self._resource_version is None:
                self.sweep()
            assert self._resource_version is not None
            for kind, obj in self.api.watch(self._resource_version):
                self._events += 1
                if kind in ("ADDED", "MODIFIED"):
                    self.consider(obj)
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self._resource_version = str(version)
                if self.stop.is_set():
                    return
        except ApiError as exc:
            if exc.status != 410:
                raise
            log.info("the watch from resourceVersion %s expired (410 Gone): listing again",
                     self._resource_version)
            self._resource_version = None

    @staticmethod
    def _log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else 0.0
        what = exc.explain() if isinstance(exc, ApiError) else str(exc)
        log.warning("Kubernetes API: %s; trying again in %.1f s (attempt %d)", what, wait, state.attempt_number)

    def _wait(self, seconds: float) -> None:
        self.stop.wait(seconds)

    # -- signals -------------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler for SIGTERM/SIGINT: stop, and leave a blocking watch or pause at
        once by raising Terminated; a label patch already sent is answered and logged
        first."""
        self.stop.set()
        if self._patching:
            self._signal = signum
            return
        raise Terminated(signum)

    def _deferred_signal(self) -> None:
        if self._signal is not None:
            signum, self._signal = self._signal, None
            raise Terminated(signum)


# -- the real API ---------------------------------------------------------------------------------


class KubeGroupContents:
    """GroupContents over the Kubernetes Python client (CustomObjectsApi and its Watch)."""

    def __init__(self, api_client: Any) -> None:
        self._k8s: Any = importlib.import_module("kubernetes")
        self._urllib3: Any = importlib.import_module("urllib3")
        self._api = self._k8s.client.CustomObjectsApi(api_client)

    @classmethod
    def connect(cls, kubeconfig: str = "") -> KubeGroupContents:
        """From `kubeconfig` when given, else the pod's service account, else $KUBECONFIG
        or ~/.kube/config. ValueError with one line when none is usable."""
        try:
            kubernetes: Any = importlib.import_module("kubernetes")
        except ImportError:
            raise ValueError("the kubernetes Python client is not installed (the kube extra: "
                             "pip install 'thinloop[kube]')") from None
        configuration = kubernetes.client.Configuration()
        try:
            if kubeconfig:
                if not os.path.exists(kubeconfig):
                    raise ValueError(f"kubeconfig {kubeconfig} does not exist")
                kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                kubernetes.config.load_incluster_config(client_configuration=configuration)
            else:
                kubernetes.config.load_kube_config(client_configuration=configuration)
        except ValueError:
            raise
        except Exception as exc:  # the client raises several unrelated types
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"no Kubernetes API access (no in-cluster service account and no usable "
                             f"kubeconfig: {first}); pass --kubeconfig") from None
        return cls(kubernetes.client.ApiClient(configuration))

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._k8s.client.ApiException as exc:
            raise ApiError(int(exc.status or 0), _reason(exc)) from None
        except (OSError, self._urllib3.exceptions.HTTPError) as exc:
            raise ApiError(0, str(exc) or type(exc).__name__) from None

    def list(self) -> tuple[list[Obj], str]:
        got = self._call(self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                         label_selector=UNLABELLED, _request_timeout=30)
        return list(got.get("items") or []), str((got.get("metadata") or {}).get("resourceVersion") or "")

    def watch(self, resource_version: str) -> Iterator[tuple[str, Obj]]:
        w = self._k8s.watch.Watch()
        stream = w.stream(self._api.list_cluster_custom_object, GROUP, VERSION, PLURAL,
                          label_selector=UNLABELLED, resource_version=resource_version,
                          allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                          _request_timeout=(10, WATCH_SECONDS + 30))
        try:
            while True:
                event = self._call(next, stream, None)
                if event is None:
                    return
                yield str(event["type"]), event["raw_object"]
        finally:
            stream.close()

    def label(self, name: str, resource_version: str, key: str, value: str) -> None:
        # A merge patch that names resourceVersion is applied only at that version.
        body = {"metadata": {"resourceVersion": resource_version, "labels": {key: value}}}
        self._call(self._api.patch_cluster_custom_object, GROUP, VERSION, PLURAL, name, body,
                   _content_type="application/merge-patch+json", _request_timeout=30)


def _reason(exc: Any) -> str:
    """The API server's Status message when the body has one, else the HTTP reason."""
    import json
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError, TypeError):
        message = None
    return str(message or exc.reason or "error")
