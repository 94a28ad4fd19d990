"""What a volume is made with, as the volume model takes it: its parameters once resolved
from a request (VolumeParams), the diskformats and reclaim modes there are and the rule
between them, and sizes: the largest volume, and Kubernetes quantities ("512Mi", "2Gi")
as thinloopctl and inline ephemeral volumes give them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InvalidArgument, OutOfRange

MAX_SIZE = 64 * (1 << 40)
"""The largest volume, in bytes."""
DISKFORMATS = ("thin", "zeroedthick", "eagerzeroedthick")
RECLAIM_MODES = ("discard", "none")


@dataclass(frozen=True)
class VolumeParams:
    """What CreateVolume's parameters and capabilities resolve to."""

    fs_type: str
    """ext3/ext4/xfs, or empty for a volume only ever used as a raw block device"""
    diskformat: str
    reclaim: str
    access_type: str
    """mount, block, or both (mount and block capabilities were asked for)"""
    extra: dict[str, str]
    """csi.storage.k8s.io/ keys (PVC name and namespace and the like)"""
    fs_explicit: bool = True
    """False when fs_type is only the default (a restore then keeps its source's)"""


def check_reclaim(diskformat: str, reclaim: str | None) -> str:
    """The reclaim mode of a volume of this diskformat: the one given, else `discard` for
    thin and `none` for thick. A thick volume promises to keep its whole size allocated
    on the node, and discard gives freed blocks back: asking for both is refused."""
    if reclaim is None:
        return "discard" if diskformat == "thin" else "none"
    if reclaim not in RECLAIM_MODES:
        raise InvalidArgument(f"reclaim {reclaim!r} is not supported; use one of {', '.join(RECLAIM_MODES)}")
    if reclaim == "discard" and diskformat != "thin":
        raise InvalidArgument(
            f"reclaim 'discard' cannot go with diskformat {diskformat!r}: a {diskformat} volume keeps "
            "its whole size allocated on the node, and discard would give freed blocks back to it; "
            "use reclaim 'none' (the default for thick volumes) or diskformat 'thin'")
    return reclaim


_QUANTITY_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([KMGTPE]i?|k)?")
_SUFFIX = {"": 1, "k": 1000, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4, "P": 1000**5,
           "E": 1000**6, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
           "Pi": 1 << 50, "Ei": 1 << 60}


def parse_quantity(text: str) -> int:
    """Kubernetes-style quantity ("256Mi", "1G", "1073741824") to bytes."""
    m = _QUANTITY_RE.fullmatch(text.strip())
    if not m:
        raise InvalidArgument(f"size {text[:40]!r} is not a quantity such as 512Mi or 2Gi")
    value = float(m.group(1)) * _SUFFIX[m.group(2) or ""]
    if not math.isfinite(value) or value <= 0:
        raise InvalidArgument(f"size {text[:40]!r} must be positive")
    if value > MAX_SIZE:  # also keeps it inside the int64 of a CapacityRange
        raise OutOfRange(f"size {text[:40]!r} is larger than the largest volume ({MAX_SIZE} bytes)")
    return math.ceil(value)
