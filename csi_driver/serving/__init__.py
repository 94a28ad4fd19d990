"""Serving: what makes the driver a process that serves CSI: start-up checks, wiring the
services to the gRPC server, the interceptor that turns errors into status codes and logs
one line per call, handler worker processes, metrics.

May import: every layer below (the CSI faces, the volume model, the host) and the
foundation modules. Never ops."""
