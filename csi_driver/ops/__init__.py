"""The operator's tool, thinloopctl (ctl), and what it is made of: the CSI client (client),
what a command returns (outcome), doctor, orphans, the datastore commands (dsctl,
dsstatus), the group snapshot labeller (grouplabels) and the demo (demo).

May import: the volume model and the host (read paths, and the careful removals of orphans
and trim), the foundation modules. Never the CSI faces or serving: thinloopctl talks to a
driver through its socket."""
