"""The volume model on disk: the store (directories and meta.json are the only record),
the mechanics of one volume on the host (image, loop device, filesystem, mounts, health,
growth, removal), snapshots and group snapshots, keys in flight, the data dir's lock and
start-up recovery. The shared datastore's model is its own subpackage
(csi_driver.volumes.datastore).

May import: the host (csi_driver.host) and the foundation modules. Never the CSI faces,
serving or ops."""
