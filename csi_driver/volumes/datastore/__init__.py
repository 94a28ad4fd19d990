"""The shared datastore's model (shared mode): its records (marker, node registrations,
attachments, holders), the image locks that fence a node, the probes of what its
filesystem can do, and a node's start-up recovery of its locks.

May import: the store and the data dir lock of csi_driver.volumes, the host and the
foundation modules. Never the node-local volume mechanics above it, the CSI faces,
serving or ops."""
