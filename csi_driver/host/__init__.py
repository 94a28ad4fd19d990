"""The host: the OS layer's interface (oslayer) and its Linux implementation (linux), the
kernel calls behind losetup and mount (syscalls), the one subprocess runner (runner), this
process's Linux capabilities (caps), and the sweep of a whole directory tree for tests,
benchmarks and the demo (sweep).

May import: the foundation modules only. Nothing of the volume model, the CSI faces,
serving or ops."""
