"""The library's exceptions, and their mapping to and from gRPC status codes (one place)."""

from __future__ import annotations

import grpc


class KVCacheError(Exception):
    """Base of every error the KV-cache store raises."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class NotFound(KVCacheError):
    code = grpc.StatusCode.NOT_FOUND


class Corrupt(KVCacheError):
    """Bytes failed their checksum (on disk or on the wire)."""

    code = grpc.StatusCode.DATA_LOSS


class Unavailable(KVCacheError):
    code = grpc.StatusCode.UNAVAILABLE


class InvalidArgument(KVCacheError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class QuotaExceeded(KVCacheError):
    """A record over the size limit, a full store, or a tenant over its quota."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(KVCacheError):
    code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(KVCacheError):
    """The node will not do this in its present configuration."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE = {
    cls.code: cls
    for cls in (NotFound, Corrupt, Unavailable, InvalidArgument, QuotaExceeded, Unauthenticated, FailedPrecondition)
}
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable
_BY_CODE[grpc.StatusCode.CANCELLED] = Unavailable


def from_rpc_error(err: grpc.RpcError, node: str = "") -> KVCacheError:
    """Translate a failed call into the library's exception, naming the node."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_status(code, details, node)


def from_status(code: grpc.StatusCode, details: str, node: str = "") -> KVCacheError:
    """The library's exception for a status code (a gRPC reply or a data-plane ERROR frame)."""
    cls = _BY_CODE.get(code, KVCacheError)
    where = f"{node}: " if node else ""
    exc = cls(f"{where}{code.name}: {details}")
    exc.code = code
    return exc
