"""The kvcache.v1 protobuf messages and gRPC stubs, generated from ``proto/`` on first import."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_PROTO = _ROOT / "proto" / "kvcache" / "v1" / "kvcache.proto"
_OUT = pathlib.Path(__file__).resolve().parent / "_pb" / "kvcache" / "v1"


def generate() -> None:
    """Run protoc over ``proto/`` into ``kvproto/_pb`` (imports rooted at ``kvproto._pb``)."""
    from grpc_tools import protoc  # build-time dependency only
    import grpc_tools

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    _OUT.mkdir(parents=True, exist_ok=True)
    for pkg in (_OUT.parent, _OUT):
        (pkg / "__init__.py").touch()
    args = [
        "protoc",
        f"-I{include}",
        f"-Ikvproto/_pb={_ROOT / 'proto'}",
        f"--python_out={_ROOT}",
        f"--grpc_python_out={_ROOT}",
        f"--pyi_out={_ROOT}",
        "kvproto/_pb/kvcache/v1/kvcache.proto",
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed for {_PROTO}")


def _stale() -> bool:
    generated = _OUT / "kvcache_pb2.py"
    if not generated.exists():
        return True
    if generated.stat().st_mtime >= _PROTO.stat().st_mtime:
        return False
    # a newer .proto: regenerate where the build tool is installed (a deployed copy may lack it)
    return importlib.util.find_spec("grpc_tools") is not None


if _PROTO.exists() and _stale():
    generate()

kvcache_pb2 = importlib.import_module("kvproto._pb.kvcache.v1.kvcache_pb2")
kvcache_pb2_grpc = importlib.import_module("kvproto._pb.kvcache.v1.kvcache_pb2_grpc")

SERVICE_NAME = "kvcache.v1.KVCache"
