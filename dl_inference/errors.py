"""One error type for the whole server, and one table mapping its codes to gRPC and HTTP.

Core code raises :class:`ServerError` (or a subclass); the gRPC and HTTP frontends translate the
code with :data:`HTTP_STATUS` / :func:`grpc_status_name`, so an error means the same on both.
"""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Error codes; names are the gRPC status names so the gRPC mapping is by name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    INTERNAL = "INTERNAL"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"  # appended: WIRE_CODE numbers follow this order


HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.NOT_FOUND: 404,
    Code.UNAVAILABLE: 503,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.INTERNAL: 500,
    Code.UNIMPLEMENTED: 501,
    Code.ALREADY_EXISTS: 409,
    Code.CANCELLED: 499,
    Code.DEADLINE_EXCEEDED: 504,
    Code.FAILED_PRECONDITION: 400,
    Code.UNAUTHENTICATED: 401,
    Code.PERMISSION_DENIED: 403,
}

# Stable small integers for the worker<->gateway frame header (never renumber).
WIRE_CODE: dict[Code, int] = {code: i + 1 for i, code in enumerate(Code)}
CODE_FROM_WIRE: dict[int, Code] = {v: k for k, v in WIRE_CODE.items()}


class ServerError(Exception):
    """An error with a protocol-independent code and a message meant for the client."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str, code: Code | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[type[ServerError], tuple[str, Code]]:  # keeps the code across processes
        return type(self), (self.message, self.code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]


class InvalidArgument(ServerError):
    code = Code.INVALID_ARGUMENT


class NotFound(ServerError):
    code = Code.NOT_FOUND


class Unavailable(ServerError):
    code = Code.UNAVAILABLE


class ResourceExhausted(ServerError):
    code = Code.RESOURCE_EXHAUSTED


class Unimplemented(ServerError):
    code = Code.UNIMPLEMENTED


class InternalError(ServerError):
    code = Code.INTERNAL


class AlreadyExists(ServerError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(ServerError):
    code = Code.FAILED_PRECONDITION
