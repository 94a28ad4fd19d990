"""Things on this node that nothing owns any more, and their careful removal.

- images whose volume no PersistentVolume refers to (needs the Kubernetes API: without it
  images cannot be judged, and are not);
- PersistentVolumes of this driver left in the Released phase;
- loop devices backed by a file in the data dir that is no longer a volume or snapshot
  (deleted, or moved to the trash), and the mounts of such devices.

Removal never touches anything in use: an image with a loop device or a mount is skipped,
a loop device is detached only once nothing mounts it, and unmounting is a plain umount
that fails when a process still holds files there."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Aborted
from ..host.oslayer import FileId, LoopDevice, MountEntry, OSLayer, file_id
from ..host.runner import CommandError
from ..volumes.grouprecords import GROUPS_DIR, GroupRecords
from ..volumes.inflight import InFlight
from ..volumes.lifecycle import device_mounts
from ..volumes.store import Store

log = logging.getLogger(__name__)

DELETED_SUFFIX = " (deleted)"
"""sysfs appends this to a loop device's backing_file when the file was unlinked."""


@dataclass(frozen=True)
class PersistentVolume:
    """The parts of a PersistentVolume that matter here."""

    name: str
    driver: str
    volume_handle: str
    phase: str
    reclaim_policy: str = ""
    claim: str = ""
    """namespace/name of the claim it was bound to."""
    node: str = ""
    """The node its topology pins it to, when it has one."""


@dataclass
class ClusterView:
    """What the Kubernetes API said; built by `load_cluster`, or by tests by hand."""

    pvs: list[PersistentVolume]
    snapshot_handles: set[str] | None = None
    """Snapshot handles of VolumeSnapshotContents; None when that API is not there."""
    delete_pv: Callable[[str], None] | None = None


@dataclass(frozen=True)
class Orphan:
    kind: str
    """image, snapshot-image, released-pv, loop or mount"""
    id: str
    """volume/snapshot id, PV name, loop device or mount point"""
    detail: str
    deletable: bool
    reason: str = ""
    """Why it cannot be deleted from here, when it cannot."""
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    orphans: list[Orphan] = field(default_factory=list)
    cluster_note: str = ""
    """Set when the cluster could not be read: images and PVs were not judged."""

    def to_dict(self) -> dict[str, Any]:
        return {"orphans": [o.to_dict() for o in self.orphans],
                "cluster_checked": not self.cluster_note, "cluster_note": self.cluster_note}


# -- the cluster ------------------------------------------------------------------------------


GRACE_SECONDS = 600.0
"""How old a volume must be before a missing PersistentVolume makes it an orphan."""


def _pv_from_api(pv: Any) -> PersistentVolume | None:
    csi = pv.spec.csi if pv.spec is not None else None
    if csi is None:
        return None
    claim = pv.spec.claim_ref
    node = ""
    affinity = pv.spec.node_affinity
    if affinity is not None and affinity.required is not None:
        for term in affinity.required.node_selector_terms or []:
            for expr in term.match_expressions or []:
                if expr.key.startswith("topology.") and expr.values:
                    node = expr.values[0]
    return PersistentVolume(
        name=pv.metadata.name, driver=csi.driver, volume_handle=csi.volume_handle,
        phase=pv.status.phase if pv.status is not None else "",
        reclaim_policy=pv.spec.persistent_volume_reclaim_policy or "",
        claim=f"{claim.namespace}/{claim.name}" if claim is not None else "", node=node)


def load_cluster(kubeconfig: str = "") -> ClusterView | str:
    """Read PersistentVolumes (and VolumeSnapshotContents) through the Kubernetes API, from
    the in-cluster service account or a kubeconfig. Returns the reason when it cannot."""
    try:
        k8s: Any = importlib.import_module("kubernetes")
    except ImportError:
        return ("the kubernetes Python client is not installed (pip install 'thinloop[kube]'); "
                "images and PersistentVolumes were not judged")
    try:
        if kubeconfig:
            if not os.path.exists(kubeconfig):
                return f"kubeconfig {kubeconfig} does not exist; images and PersistentVolumes were not judged"
            k8s.config.load_kube_config(config_file=kubeconfig)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            k8s.config.load_incluster_config()
        else:
            k8s.config.load_kube_config()
    except Exception as exc:  # the client raises several unrelated types
        return (f"no Kubernetes API access (no in-cluster service account and no usable "
                f"kubeconfig: {exc}); images and PersistentVolumes were not judged")
    core = k8s.client.CoreV1Api()
    try:
        items = core.list_persistent_volume(_request_timeout=30).items
    except Exception as exc:  # API or network error
        return f"cannot list PersistentVolumes: {exc}; images and PersistentVolumes were not judged"
    pvs = [pv for pv in (_pv_from_api(i) for i in items) if pv is not None]
    handles: set[str] | None
    try:
        contents = k8s.client.CustomObjectsApi().list_cluster_custom_object(
            "snapshot.storage.k8s.io", "v1", "volumesnapshotcontents", _request_timeout=30)
        handles = {c.get("status", {}).get("snapshotHandle", "") or
                   c.get("spec", {}).get("source", {}).get("snapshotHandle", "")
                   for c in contents.get("items", [])} - {""}
    except Exception as exc:  # no snapshot CRDs, or no permission
        log.info("snapshot contents not readable (%s); snapshot images not judged", exc)
        handles = None

    def delete_pv(name: str) -> None:
        core.delete_persistent_volume(name, _request_timeout=30)

    return ClusterView(pvs, handles, delete_pv)


# -- finding ----------------------------------------------------------------------------------


def _inside(path: str, root: str) -> bool:
    return path.startswith(root.rstrip("/") + "/")


def _owned_images(store: Store) -> tuple[set[str], set[FileId]]:
    images = [e.image for coll in (store.volumes, store.snapshots) for e in coll.entries()]
    return {os.path.realpath(i) for i in images}, {f for f in map(file_id, images) if f is not None}


def _orphan_loops(store: Store, loops: list[LoopDevice]) -> list[LoopDevice]:
    """Loop devices backed by a file in this data dir that is not a current image. A
    device attached before the driver's container restarted shows a path relative to the
    old namespace (/volumes/<id>/disk.img): it is this data dir's only if it is a current
    image (matched by identity), and then it is no orphan; a deleted one cannot be told
    apart from another data dir's, so it is not judged."""
    data = os.path.realpath(store.data_dir)
    paths, ids = _owned_images(store)
    found = []
    for loop in loops:
        deleted = loop.backing_file.endswith(DELETED_SUFFIX)
        backing = loop.backing_file[: -len(DELETED_SUFFIX)] if deleted else loop.backing_file
        if not _inside(backing, data):
            continue
        owned = loop.backing_id in ids if loop.backing_id is not None else backing in paths
        if deleted or not owned:
            found.append(loop)
    return found


def _in_use(store_image: Path, oslayer: OSLayer, mounts: list[MountEntry]) -> str:
    loop = oslayer.find_loop(store_image)
    if loop is None:
        return ""
    where = [m.mount_point for m in device_mounts(mounts, loop)]
    return f"in use: attached as {loop.device}" + (f", mounted at {', '.join(where)}" if where else "")


def find(store: Store, oslayer: OSLayer, driver_name: str, node_id: str,
         cluster: ClusterView | str, grace_seconds: float = GRACE_SECONDS) -> Report:
    """Everything orphaned on this node. `cluster` is a ClusterView, or the reason the
    cluster could not be read (then images and PVs are not judged). Volumes younger than
    grace_seconds are never orphans: the provisioner makes the PV after CreateVolume."""
    report = Report()
    mounts = oslayer.mounts()
    for loop in _orphan_loops(store, oslayer.loop_devices()):
        for m in device_mounts(mounts, loop):
            report.orphans.append(Orphan("mount", m.mount_point,
                                         f"mount of {loop.device} ({loop.backing_file})", True))
        report.orphans.append(Orphan("loop", loop.device, f"backed by {loop.backing_file}", True,
                                     path=loop.backing_file))
    if isinstance(cluster, str):
        report.cluster_note = cluster
        return report
    ours = [pv for pv in cluster.pvs if pv.driver == driver_name]
    handles = {pv.volume_handle for pv in ours}
    if not ours and (store.volumes.ids() or (not cluster.snapshot_handles and store.snapshots.ids())):
        # Every image would look orphaned: far more likely a wrong --driver-name or cluster.
        report.cluster_note = (f"no PersistentVolume of driver {driver_name} exists in this cluster, yet the "
                               "node holds volumes or snapshots: check --driver-name and the kubeconfig; "
                               "images not judged")
        return report
    now = time.time()
    for entry in store.volumes.entries():
        if entry.id in handles or (entry.meta.ephemeral and _in_use(entry.image, oslayer, mounts)):
            continue  # a PV refers to it, or it is a live inline ephemeral volume
        if now - entry.meta.created < grace_seconds:
            continue  # just made: its PersistentVolume may not exist yet
        busy = _in_use(entry.image, oslayer, mounts)
        what = "inline ephemeral volume not in use" if entry.meta.ephemeral else \
            "no PersistentVolume refers to this volume"
        report.orphans.append(Orphan("image", entry.id, f"{what} (name {entry.meta.name})",
                                     not busy, busy, str(entry.path)))
    if cluster.snapshot_handles is not None:
        groups = GroupRecords(store.data_dir / GROUPS_DIR).membership()
        for entry in store.snapshots.entries():
            # The snapshotter records the handle only after CreateSnapshot returns.
            if entry.id not in cluster.snapshot_handles and now - entry.meta.created >= grace_seconds:
                # A member of a volume group snapshot goes only with its group.
                group = groups.group_of(entry.meta)
                reason = f"part of volume group snapshot {group}: thinloopctl delete-group-snapshot {group}" \
                    if group else ""
                report.orphans.append(Orphan("snapshot-image", entry.id,
                                             "no VolumeSnapshotContent refers to this snapshot",
                                             group == "", reason, path=str(entry.path)))
    local = set(store.volumes.ids())
    for pv in ours:
        if pv.phase != "Released":
            continue
        detail = (f"Released (reclaim policy {pv.reclaim_policy or '?'}, was {pv.claim or '?'}), "
                  f"volume {pv.volume_handle}")
        if pv.volume_handle in local:
            held = store.volumes.get(pv.volume_handle)
            busy = _in_use(held.image, oslayer, mounts) if held is not None else ""
            report.orphans.append(Orphan("released-pv", pv.name, detail, not busy, busy,
                                         str(store.volumes.path(pv.volume_handle))))
        elif pv.node and pv.node != node_id:
            report.orphans.append(Orphan("released-pv", pv.name, detail, False,
                                         f"its volume is on node {pv.node}: run this there"))
        else:
            report.orphans.append(Orphan("released-pv", pv.name, detail + " (image already gone)",
                                         True))
    return report


# -- removing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    orphan: Orphan
    deleted: bool
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.orphan.to_dict(), "deleted": self.deleted, "message": self.message}


def _key_of(orphan: Orphan, cluster: ClusterView | str) -> str:
    """The in-flight key of the volume or snapshot an orphan's removal deletes, if any."""
    if orphan.kind == "image":
        return f"vol:{orphan.id}"
    if orphan.kind == "snapshot-image":
        return f"snapshot:{orphan.id}"
    if orphan.kind == "released-pv" and not isinstance(cluster, str):
        pv = next((p for p in cluster.pvs if p.name == orphan.id), None)
        return f"vol:{pv.volume_handle}" if pv is not None else ""
    return ""


def remove(report: Report, store: Store, oslayer: OSLayer, cluster: ClusterView | str,
           progress: Callable[[Orphan], None] | None = None,
           inflight: InFlight | None = None) -> list[Outcome]:
    """Remove every deletable orphan: mounts first, then loop devices, then images, then
    PersistentVolume objects (after their image). State is re-read before each step, so
    whatever came into use since `find` is left alone. With `inflight` (the data dir's
    in-flight keys, which a running driver holds while it works on a volume or snapshot)
    each image is removed holding its key, and one the driver is working on is skipped."""
    order = {"mount": 0, "loop": 1, "image": 2, "snapshot-image": 2, "released-pv": 3}
    outcomes: list[Outcome] = []
    for orphan in sorted(report.orphans, key=lambda o: order.get(o.kind, 9)):
        if not orphan.deletable:
            outcomes.append(Outcome(orphan, False, f"skipped: {orphan.reason}"))
            continue
        if progress is not None:
            progress(orphan)
        try:
            with inflight.hold(_key_of(orphan, cluster)) if inflight is not None else nullcontext():
                message = _remove_one(orphan, store, oslayer, cluster)
            outcomes.append(Outcome(orphan, not message.startswith("skipped"), message))
        except Aborted as exc:
            outcomes.append(Outcome(orphan, False, f"skipped: busy ({exc.message}); run again later"))
        except (CommandError, OSError) as exc:
            outcomes.append(Outcome(orphan, False, f"failed: {exc}"))
        except Exception as exc:  # an API error must not stop the rest
            outcomes.append(Outcome(orphan, False, f"failed: {type(exc).__name__}: {exc}"))
    return outcomes


def _remove_one(orphan: Orphan, store: Store, oslayer: OSLayer, cluster: ClusterView | str) -> str:
    mounts = oslayer.mounts()
    if orphan.kind == "mount":
        if not any(m.mount_point == orphan.id for m in mounts):
            return "already unmounted"
        oslayer.unmount(orphan.id)
        return "unmounted"
    if orphan.kind == "loop":
        loop = next((d for d in oslayer.loop_devices() if d.device == orphan.id), None)
        if loop is None:
            return "already detached"
        if loop not in _orphan_loops(store, [loop]):
            return "skipped: it backs a current image again"
        still = device_mounts(mounts, loop)
        if still:
            return f"skipped: still mounted at {', '.join(m.mount_point for m in still)}"
        oslayer.detach_loop(loop.device)
        return "detached"
    if orphan.kind in ("image", "snapshot-image"):
        coll = store.volumes if orphan.kind == "image" else store.snapshots
        entry = coll.get(orphan.id)
        if entry is None:
            return "already gone"
        busy = _in_use(entry.image, oslayer, mounts)
        if busy:
            return f"skipped: {busy}"
        coll.delete(orphan.id)
        return "deleted"
    if orphan.kind == "released-pv":
        if isinstance(cluster, str) or cluster.delete_pv is None:
            return "skipped: no Kubernetes API access"
        pv = next((p for p in cluster.pvs if p.name == orphan.id), None)
        if pv is not None:
            entry = store.volumes.get(pv.volume_handle) if pv.volume_handle in store.volumes.ids() \
                else None
            if entry is not None:
                busy = _in_use(entry.image, oslayer, mounts)
                if busy:
                    return f"skipped: {busy}"
                store.volumes.delete(entry.id)
        cluster.delete_pv(orphan.id)
        return "deleted the PersistentVolume and its image"
    return "skipped: unknown kind"
