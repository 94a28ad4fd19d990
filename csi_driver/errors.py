"""Domain errors. Each carries the gRPC status code it is reported with; status_of is the
one place that turns an exception into a status (the server's interceptor, and the
handler worker processes, call it)."""

from __future__ import annotations

import logging

import grpc

from .runner import CommandError

log = logging.getLogger("thinloop.rpc")


class DriverError(Exception):
    """An expected failure with a definite gRPC status code."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(DriverError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(DriverError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(DriverError):
    code = grpc.StatusCode.ALREADY_EXISTS


class OutOfRange(DriverError):
    code = grpc.StatusCode.OUT_OF_RANGE


class ResourceExhausted(DriverError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(DriverError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(DriverError):
    code = grpc.StatusCode.ABORTED


class Unimplemented(DriverError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(DriverError):
    """Transient: the call may succeed when retried (gRPC UNAVAILABLE)."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(DriverError):
    code = grpc.StatusCode.INTERNAL


class Remote(DriverError):
    """A status a handler worker process reported for a call (csi_driver.workers)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


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
