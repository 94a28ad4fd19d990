"""The one place a call's outcome becomes its gRPC status, and one structured log line per
call: the server's interceptor (and the handler worker processes, through status_of).

A DriverError ends the call with its own code; a failed command (CommandError) and
anything unexpected end it as INTERNAL, logged with the command's stderr or the
traceback. Never UNKNOWN."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from ..errors import DriverError
from ..host.runner import CommandError

log = logging.getLogger("thinloop.rpc")

Observer = Callable[[str, str, float], None]
"""Called after every RPC with (method, status code name, seconds)."""

_ID_FIELDS = {"volume_id": "volume_id", "name": "req_name", "snapshot_id": "snapshot_id",
              "source_volume_id": "source_volume_id", "group_snapshot_id": "group_snapshot_id"}


def _subject(request: Any) -> dict[str, str]:
    """The fields worth logging; never secrets or whole requests."""
    out = {}
    for f, key in _ID_FIELDS.items():
        value = getattr(request, f, "")
        if isinstance(value, str) and value:
            out[key] = value[:128]
    return out


class RpcInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Maps DriverError to its code, anything else to INTERNAL (traceback logged), and
    writes one structured line per call."""

    def __init__(self, observers: list[Observer]) -> None:
        self.observers = observers

    def _finish(self, method: str, request: Any, started: float, code: grpc.StatusCode,
                detail: str) -> None:
        elapsed = time.monotonic() - started
        try:
            self._record(method, request, elapsed, code, detail)
        except Exception:
            logging.getLogger(__name__).exception("recording %s failed", method)

    def _record(self, method: str, request: Any, elapsed: float, code: grpc.StatusCode,
                detail: str) -> None:
        extra = {"method": method, "code": code.name, "duration_ms": round(elapsed * 1000, 2),
                 **_subject(request)}
        if code == grpc.StatusCode.OK:
            log.info("%s OK", method, extra=extra)
        else:
            log.warning("%s %s: %s", method, code.name, detail, extra=extra)
        for obs in self.observers:
            obs(method, code.name, elapsed)

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                started = time.monotonic()
                try:
                    response = inner(request, context)
                except Exception as exc:
                    code, detail = status_of(exc, method)
                    self._finish(method, request, started, code, detail)
                    context.abort(code, detail)
                self._finish(method, request, started, grpc.StatusCode.OK, "")
                return response

            return grpc.unary_unary_rpc_method_handler(
                unary, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                started = time.monotonic()
                try:
                    yield from inner_stream(request, context)
                except Exception as exc:
                    code, detail = status_of(exc, method)
                    self._finish(method, request, started, code, detail)
                    context.abort(code, detail)
                self._finish(method, request, started, grpc.StatusCode.OK, "")

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


def status_of(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a call that raised `exc` ends with; logs what a DriverError does not
    already explain (a failed command, a bug with its traceback)."""
    if isinstance(exc, DriverError):
        return exc.code, exc.message
    if isinstance(exc, CommandError):
        log.error("%s: command failed: %s", method, exc)
        return grpc.StatusCode.INTERNAL, str(exc)
    log.exception("%s: unexpected error", method)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
