"""Start-up recovery steps that look at the host as well as the store (the store's own, of
unfinished and half-deleted objects, is Store.recover; group snapshots',
GroupSnapshots.recover; the order they run in is the serving layer's)."""

from __future__ import annotations

import logging
import os

from ..host.oslayer import OSLayer, file_id
from ..host.runner import CommandError
from .store import Store

log = logging.getLogger("thinloop.server")


def thaw_frozen(store: Store, oslayer: OSLayer) -> list[str]:
    """A crash between a snapshot's freeze and thaw leaves the volume's filesystem
    frozen, hanging every writer: thaw the filesystems of this driver's loop devices.
    fsfreeze fails with EINVAL on one that is not frozen, which is the usual case.
    Returns one line per filesystem thawed."""
    actions = []
    root = os.path.realpath(store.volumes.root) + os.sep
    ours = {file_id(e.image) for e in store.volumes.entries()} - {None}
    mounts = oslayer.mounts()
    for loop in oslayer.loop_devices():
        if loop.backing_id not in ours and not loop.backing_file.startswith(root):
            continue
        own = [m.mount_point for m in mounts if m.major_minor == loop.major_minor and m.root == "/"]
        if not own:
            continue
        try:
            oslayer.thaw(own[0])  # one superblock: thawing one of its mounts is enough
        except CommandError as exc:
            if "Invalid argument" not in exc.stderr:
                log.warning("recovery: cannot thaw %s: %s", own[0], exc)
            continue
        actions.append(f"thawed {own[0]} ({loop.device}), left frozen by an interrupted snapshot")
    return actions
