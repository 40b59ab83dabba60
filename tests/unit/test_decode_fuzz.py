"""Fuzzing the decoder: any bytes either decode or raise InvalidRequest, nothing else."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathwatch.receiver.decode import Decoder, DecodeResult, InvalidRequest, TimeBounds
from pathwatch.rules.builtin import PARITY_RULE
from tests.support import Proc, process_request

NOW = 1_800_000_000_000
BOUNDS = TimeBounds(NOW - 40 * 86_400_000, NOW + 300_000)
DECODER = Decoder([PARITY_RULE])
VALID = process_request([Proc(1, "/bin/a"), Proc(2, "/tmp/b")], NOW - 60_000).SerializeToString()


def _decode(data: bytes) -> DecodeResult | None:
    try:
        result = DECODER.decode(data, BOUNDS)
    except InvalidRequest:
        return None
    assert result.points_accepted >= 0 and result.points_rejected >= 0
    for (rule, key), sighting in result.batch.items():
        assert rule == PARITY_RULE.id and len(key) == len(PARITY_RULE.key_fields)
        assert all(key) and sighting.minutes
    return result


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.binary(max_size=2048))
def test_random_bytes_never_crash(data: bytes) -> None:
    """Arbitrary bytes decode or raise InvalidRequest."""
    _decode(data)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(VALID)))  # fmt: skip
def test_mutated_valid_requests_never_crash(flips: list[tuple[int, int]], cut: int) -> None:
    """A real request with flipped bytes and a random cut decodes or raises InvalidRequest."""
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    _decode(bytes(data[:cut]))
