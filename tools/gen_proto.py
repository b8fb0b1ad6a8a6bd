"""Generate the kvcache.v1 stubs into kvproto/_pb (run by `make venv`; also done on import)."""

from kvproto import pb

if __name__ == "__main__":
    pb.generate()
    print("generated kvproto/_pb/kvcache/v1/kvcache_pb2{,_grpc}.py")
