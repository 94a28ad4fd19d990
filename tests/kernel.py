"""Kernel objects a test made under its temporary directory (see csi_driver.sweep)."""

from __future__ import annotations

from csi_driver.sweep import loops_under, mounts_under
from csi_driver.sweep import sweep as cleanup

__all__ = ["cleanup", "loops_under", "mounts_under"]
