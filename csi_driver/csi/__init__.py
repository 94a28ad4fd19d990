"""The CSI faces: the gRPC services kubelet and the sidecars call (Identity, Controller,
GroupController, Node, SnapshotMetadata) and the plain functions that validate their
requests. Each handler checks its request, takes the volume's in-flight key and calls the
volume model; it reaches the host only through the OS layer's interface
(csi_driver.host.oslayer), never its Linux implementation.

May import: the volume model (csi_driver.volumes), the host's interface, the foundation
modules and the generated stubs. Never serving or ops."""
