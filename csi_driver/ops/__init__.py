"""The operator's tool, thinloopctl, and what it is made of: the CSI client, node status,
doctor, orphans, the datastore commands, the group snapshot labeller and the demo.

May import: the volume model and the host (read paths, and the careful removals of
orphans and trim), the client, the foundation modules. Never the CSI faces or serving:
thinloopctl talks to a driver through its socket."""
