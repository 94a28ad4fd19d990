"""Which capability a refused online growth lacks, and what grants it, from proc(5)'s
CapEff/CapBnd and user_namespaces(7)'s uid_map, faked as files."""

from __future__ import annotations

from pathlib import Path

import pytest

from csi_driver.host import caps

ALL = (1 << 41) - 1
NO_RESOURCE = ALL & ~(1 << caps.CAP_SYS_RESOURCE)
HOST_MAP = "         0          0 4294967295\n"


def proc(tmp: Path, eff: int, bnd: int, uid_map: str = HOST_MAP) -> tuple[str, str]:
    (tmp / "status").write_text(f"Name:\tx\nCapEff:\t{eff:016x}\nCapBnd:\t{bnd:016x}\n")
    (tmp / "uid_map").write_text(uid_map)
    return str(tmp / "status"), str(tmp / "uid_map")


@pytest.mark.parametrize(("eff", "bnd", "uid_map", "words"), [
    (ALL, ALL, HOST_MAP, None),
    (NO_RESOURCE, ALL, HOST_MAP, "lacks CAP_SYS_RESOURCE: run the node container privileged (as the deploy "
     "does) or add SYS_RESOURCE to its securityContext.capabilities.add"),
    (NO_RESOURCE, NO_RESOURCE, HOST_MAP, "bounding set does too, so running it privileged cannot grant it"),
    (ALL, ALL, "0 100000 65536\n", "only inside a user namespace"),
])
def test_why_lacking(tmp_path: Path, eff: int, bnd: int, uid_map: str, words: str | None) -> None:
    why = caps.why_lacking(caps.CAP_SYS_RESOURCE, *proc(tmp_path, eff, bnd, uid_map))
    if words is None:
        assert why == ""
    else:
        assert words in why and "run it privileged)" not in why


def test_each_filesystem_names_the_capability_its_growth_needs() -> None:
    assert caps.needed_to_grow("ext4") == caps.needed_to_grow("ext3") == caps.CAP_SYS_RESOURCE
    assert caps.needed_to_grow("xfs") == caps.CAP_SYS_ADMIN
