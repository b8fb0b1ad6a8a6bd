"""Generated gRPC stubs for kvcache.v1 (git-ignored; produced by ``tools/gen_proto.py``).

Importing ``kvproto.pb`` generates them on first use when they are missing, so an editable
install works without a separate build step.
"""
