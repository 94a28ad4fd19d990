"""thinloop: a CSI driver serving thin loopback-file volumes.

One package per layer, and imports run one way, down (docs/architecture.md; the
import-linter contracts in pyproject.toml hold it):

    serving/           the driver as a process       ops/   thinloopctl, beside it
    csi/               the CSI services and request validation
    volumes/           the volume model on disk (volumes/datastore/: shared mode's)
    host/              the OS layer: loop devices, mounts, filesystems, commands

The modules here at the top (settings, errors, failpoints, cliparse, logsetup) are the
foundation every layer may import; they import no layer. proto/ is generated."""

__version__ = "0.1.0"
