"""Serving: the driver as a process. Flags (flags), start-up checks before anything is
made (preflight), what one driver is built from and its start-up recovery (driver), the
gRPC server, its socket and graceful stop (server), the one place an outcome becomes a
status code with one log line per call (interceptor), handler worker processes (workers),
Prometheus metrics (metrics).

May import: every layer below (the CSI faces, the volume model, the host) and the
foundation modules. Never ops, and nothing below imports serving."""
