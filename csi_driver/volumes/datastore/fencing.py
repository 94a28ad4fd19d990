"""Start-up recovery of a node's image locks (shared mode).

The loop device of a staged volume holds the image's lock itself (csi_driver.volumes.datastore.imagelock), so a
driver that restarts, even after kill -9, finds its locks still held. What start-up must
still do, before the driver serves any call, for every loop device of this host whose
backing file is an image of the datastore (found by device and inode, as node-local recovery
finds its devices, since the path sysfs shows belongs to the mount namespace that attached it):

- check the lock: if it was lost (the datastore's server dropped this client for a while and
  the client came back without it), take it again from the driver's own process, which keeps
  it until the loop device is gone;
- check the records: when another node's holder record names the image too, or its
  attachment record does not name this node, the image is attached here while the
  datastore says someone else has it: a split brain in the making. That is logged as an
  ERROR, exported (thinloop_datastore_split_brain), and the node refuses to stage, publish or
  expand that volume for as long as that loop device is there (unstage and unpublish still
  work, to let go of it; once the device is gone the fence is lifted: `fence_of`);
- write this node's holder record where it is missing, and remove this node's holder records
  of images that are no longer attached here (after a reboot).

Nothing here imports the CSI faces or the server.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from ...host.oslayer import FileId, LoopDevice, OSLayer, file_id
from ..store import IMAGE, Entry, Store
from . import imagelock
from .records import Datastore, Holder

log = logging.getLogger(__name__)


def fence_of(fenced: Mapping[str, str], volume_id: str, store: Store, oslayer: OSLayer) -> str:
    """Why this node does not serve `volume_id` ("" when it does): the reason recovery gave,
    for as long as the loop device that recovery found is still attached here. Once the node
    has let go of it (unstage, or a detach by hand), the ordinary checks of a stage (the
    attachment's token, the image's lock) are all the volume needs, and a fence kept beyond
    that would refuse a proper publish to this node for good."""
    reason = fenced.get(volume_id, "")
    if not reason:
        return ""
    entry = store.volumes.get(volume_id)
    if entry is not None and oslayer.find_loop(entry.image) is not None:
        return reason
    return ""


class NodeFences:
    def __init__(self, node_id: str, datastore: Datastore, store: Store, oslayer: OSLayer) -> None:
        self.node_id = node_id
        self.datastore = datastore
        self.store = store
        self.os = oslayer
        self.fenced: dict[str, str] = {}
        """Volume id -> why this node does not serve it."""
        self.retaken: dict[str, int] = {}
        """Volume id -> descriptor of an image lock taken again here."""

    def recover(self) -> list[str]:
        """Check every attached image's lock and records; return what was found or done."""
        root = self.store.volumes.root
        by_id: dict[FileId, str] = {}
        for vid in self.store.volumes.ids():
            ident = file_id(root / vid / IMAGE)
            if ident is not None:
                by_id[ident] = vid
        actions = []
        attached = set()
        for loop in self.os.loop_devices():
            found = by_id.get(loop.backing_id) if loop.backing_id is not None else None
            entry = self.store.volumes.get(found) if found is not None else None
            if entry is None:
                continue
            attached.add(entry.id)
            actions.append(self._check(entry, loop))
        for holder in self.datastore.holders.all():
            if holder.node_id == self.node_id and holder.volume_id not in attached:
                self.datastore.holders.remove(holder.volume_id, self.node_id)
                actions.append(f"removed the holder record of {holder.volume_id}: no longer attached here")
        return actions

    def _check(self, entry: Entry, loop: LoopDevice) -> str:
        me = self.node_id
        readonly = loop.readonly and self.os.attached_read_only(loop.device)
        rec = self.datastore.attachments.get(entry.id)
        mine = rec.nodes.get(me) if rec is not None else None
        others = self.datastore.holders.describe(entry.id, but=me)
        fd = -1
        if imagelock.path_lock_state(entry.image) == imagelock.FREE:
            # Held by nobody, not even the device's own open file: the datastore dropped this
            # client for a while. Take it again (unless someone is quicker).
            try:
                fd = imagelock.open_locked(entry.image, readonly=readonly, direct=False)
            except imagelock.LockHeld:
                fd = -1
        if fd >= 0:
            imagelock.keep(fd)
            self.retaken[entry.id] = fd
            log.warning("the image lock of %s (%s) had been lost; took it again", entry.id, loop.device)
        problem = ""
        if others:
            problem = f"the datastore's records say {others} holds it as well"
        elif mine is None:
            where = rec.describe() if rec is not None else "no node"
            problem = f"it is not published to this node (its attachment record names {where})"
        if problem:
            reason = f"attached here as {loop.device}, but {problem}"
            self.fenced[entry.id] = reason
            log.error("SPLIT BRAIN in the making for volume %s: %s; not serving it (unstage it here, "
                      "or fence the other node)", entry.id, reason)
            return f"volume {entry.id}: not served: {reason}"
        assert mine is not None
        self.datastore.holders.put(Holder(entry.id, me, readonly, mine.generation, time.time(), loop.device))
        if fd >= 0:
            return f"volume {entry.id}: took its lost image lock again ({loop.device})"
        return f"volume {entry.id}: its image lock is held by {loop.device}"

    def release_retaken(self) -> None:
        """Let go of locks taken again whose loop device is gone (run every heartbeat)."""
        for vid, fd in list(self.retaken.items()):
            if self.os.find_loop(self.store.volumes.root / vid / IMAGE) is None:
                imagelock.release(fd)
                del self.retaken[vid]
                log.info("let go of the image lock of %s taken at start-up: its loop device is gone", vid)
