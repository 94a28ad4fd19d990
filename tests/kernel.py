"""Kernel objects a test made under its temporary directory (see csi_driver.host.sweep)."""

from __future__ import annotations

from csi_driver.host.sweep import loops_under, mounts_under
from csi_driver.host.sweep import sweep as cleanup

__all__ = ["cleanup", "loops_under", "mounts_under"]
