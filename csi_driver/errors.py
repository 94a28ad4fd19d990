"""Domain errors. Each carries the gRPC status code it is reported with
(csi_driver.serving.interceptor.status_of turns an exception into the call's status).

A foundation module: every layer may raise these; it imports nothing of any layer."""

from __future__ import annotations

import grpc


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
