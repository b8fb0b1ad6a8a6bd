"""Limits and sizes both ends of the wire agree on (one place: node and client import them)."""

from __future__ import annotations

MiB = 1 << 20

MAX_KEY_BYTES = 256
MAX_KEYS_PER_CALL = 65536
CHUNK_BYTES = 1 * MiB  # record bytes per gRPC message (measured best for Python gRPC)
GRPC_MESSAGE_LIMIT = 8 * MiB
HTTP2_MAX_FRAME = 16 * MiB - 1  # fewer, larger HTTP/2 frames per 1 MiB message
PUT_DATA_FIELD = 4  # PutRequest.data (hand-framed)
GET_DATA_FIELD = 5  # GetResponse.data (hand-framed)


def grpc_channel_options() -> list[tuple[str, int]]:
    """Message and frame limits of a channel or server (both sides the same)."""
    return [
        ("grpc.max_receive_message_length", GRPC_MESSAGE_LIMIT),
        ("grpc.max_send_message_length", GRPC_MESSAGE_LIMIT),
        ("grpc.http2.max_frame_size", HTTP2_MAX_FRAME),
    ]
