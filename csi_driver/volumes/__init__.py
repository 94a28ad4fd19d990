"""The volume model on disk: the store, where directories and meta.json are the only
record (store), one volume's mechanics on the host: image, loop device, filesystem,
mounts, health, growth, removal (lifecycle), snapshots and volume group snapshots
(snapshots, groupsnapshots, grouprecords), what a volume is made with (params), keys in
flight (inflight), the data dir's lock (datalock), readiness, node status and start-up
recovery's host steps (readiness, status, recovery). The shared datastore's model is a
subpackage of its own beneath the mechanics (csi_driver.volumes.datastore).

May import: the host (csi_driver.host) and the foundation modules. Never the CSI faces,
serving or ops."""
