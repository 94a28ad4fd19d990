"""This process's Linux capabilities, read from /proc/self/status (proc(5): CapEff, CapBnd),
and what to tell an operator when the kernel refuses a growth that needs one.

Online growth of a mounted filesystem asks the kernel for a capability in the initial user
namespace: ext3/ext4's resize ioctl checks CAP_SYS_RESOURCE (fs/ext4/resize.c,
ext4_resize_begin), xfs_growfs CAP_SYS_ADMIN (fs/xfs/xfs_ioctl.c)."""

from __future__ import annotations

CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
NAMES = {CAP_SYS_ADMIN: "CAP_SYS_ADMIN", CAP_SYS_RESOURCE: "CAP_SYS_RESOURCE"}


def _status_mask(field: str, status: str) -> int:
    with open(status, encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1], 16)
    return 0


STATUS = "/proc/self/status"
UID_MAP = "/proc/self/uid_map"


def effective(status: str = STATUS) -> int:
    """The effective set as a bit mask (bit N = capability N)."""
    return _status_mask("CapEff", status)


def bounding(status: str = STATUS) -> int:
    """The bounding set: what this process could ever gain, privileged or not."""
    return _status_mask("CapBnd", status)


def in_user_namespace(uid_map: str = UID_MAP) -> bool:
    """True unless this process is in the initial user namespace, whose uid_map maps every
    id to itself (user_namespaces(7))."""
    try:
        with open(uid_map, encoding="ascii") as f:
            rows = [line.split() for line in f if line.strip()]
    except OSError:
        return False
    return rows != [["0", "0", "4294967295"]]


def needed_to_grow(fs_type: str) -> int:
    """The capability the kernel checks to grow `fs_type` while mounted."""
    return CAP_SYS_ADMIN if fs_type == "xfs" else CAP_SYS_RESOURCE


def why_lacking(cap: int, status: str = STATUS, uid_map: str = UID_MAP) -> str:
    """Which capability is missing where, and what grants it; empty when this process
    has it in the initial user namespace."""
    name = NAMES.get(cap, f"capability {cap}")
    short = name.removeprefix("CAP_")
    if not bounding(status) & (1 << cap):
        return (f"this process lacks {name}, and its capability bounding set does too, so running "
                f"it privileged cannot grant it: the host (or the container the node itself runs in) "
                f"withholds {name}; grant it there")
    if not effective(status) & (1 << cap):
        return (f"this process lacks {name}: run the node container privileged (as the deploy "
                f"does) or add {short} to its securityContext.capabilities.add")
    if in_user_namespace(uid_map):
        return (f"this process has {name} only inside a user namespace, and the kernel wants it in "
                f"the host's: run the node pod without a user namespace (hostUsers: true)")
    return ""
