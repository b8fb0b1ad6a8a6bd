"""Generate the kvcache.v1 stubs into kvclient/_pb (run by `make venv`; also done on import)."""

from kvclient import pb

if __name__ == "__main__":
    pb.generate()
    print("generated kvclient/_pb/kvcache/v1/kvcache_pb2{,_grpc}.py")
