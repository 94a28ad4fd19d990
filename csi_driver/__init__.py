"""thinloop: a CSI driver serving thin loopback-file volumes."""

__version__ = "0.1.0"
