"""The shared datastore's model (shared mode): its records: marker, node registrations,
attachments, holders (records), the image locks that fence a node (imagelock), the probes
of what its filesystem can do (capabilities), and a node's start-up recovery of its locks
(fencing).

May import: the store, the data dir's lock and the small types of csi_driver.volumes
beneath it, the host and the foundation modules. Never the volume mechanics above it, the
CSI faces, serving or ops."""
