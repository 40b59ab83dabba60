"""Protobuf wire-format encoding: just enough to build OTLP requests as bytes, fast.

The load generator cannot afford the protobuf object model for millions of resources, so it
encodes messages directly. Every function returns one complete field (tag and payload); a
message is the concatenation of its fields. `bench.workload` checks its output against the
opentelemetry-proto classes once per run.
"""

from __future__ import annotations

import struct

_LEN, _VARINT, _I64 = 2, 0, 1
_FIXED64 = struct.Struct("<Q")
_DOUBLE = struct.Struct("<d")


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer."""
    if value < 0:
        raise ValueError("negative varints are not needed here")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def length_delimited(number: int, payload: bytes) -> bytes:
    """A bytes, string or embedded-message field."""
    return tag(number, _LEN) + varint(len(payload)) + payload


def string(number: int, text: str) -> bytes:
    return length_delimited(number, text.encode())


def uint(number: int, value: int) -> bytes:
    """A varint field (int64 / uint64 / enum / bool with a non-negative value)."""
    return tag(number, _VARINT) + varint(value)


def fixed64(number: int, value: int) -> bytes:
    """A fixed64 / sfixed64 field (OTLP timestamps and integer point values)."""
    return tag(number, _I64) + _FIXED64.pack(value)


def double(number: int, value: float) -> bytes:
    return tag(number, _I64) + _DOUBLE.pack(value)


def fixed64_bytes(value: int) -> bytes:
    """The 8 payload bytes of a fixed64 field: what a timestamp template substitutes."""
    return _FIXED64.pack(value)
