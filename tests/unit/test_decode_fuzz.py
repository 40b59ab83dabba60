"""Fuzzing the decoder: any bytes either decode or raise InvalidRequest, nothing else."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathwatch.receiver.decode import (
    UNTRACKED_REASONS,
    Decoder,
    DecodeResult,
    InvalidRequest,
    TimeBounds,
    rejection_message,
)
from pathwatch.rules.builtin import PARITY_RULE
from tests.support import Proc, process_request

NOW = 1_800_000_000_000
BOUNDS = TimeBounds(NOW - 40 * 86_400_000, NOW + 300_000)
DECODER = Decoder([PARITY_RULE])
VALID = process_request([Proc(1, "/bin/a"), Proc(2, "/tmp/b")], NOW - 60_000).SerializeToString()


def _decode(data: bytes, host_filter: Callable[[str], bool] | None = None) -> DecodeResult | None:
    try:
        result = DECODER.decode(data, BOUNDS, host_filter)
    except InvalidRequest:
        return None
    assert result.points_accepted >= 0 and result.points_rejected >= 0
    assert set(result.untracked) <= set(UNTRACKED_REASONS)
    assert all(u.resources > 0 and u.points >= 0 for u in result.untracked.values())
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


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), max_size=8),
       st.booleans())  # fmt: skip
def test_mutated_requests_under_a_host_filter_are_accounted(
    flips: list[tuple[int, int]], node_1_only: bool
) -> None:
    """Flipped bytes (bad UTF-8, broken Resources, lost timestamps), with or without a host
    filter: decode or InvalidRequest, and every rejected point has a reason in the message."""
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    result = _decode(bytes(data), (lambda h: h == "node-1") if node_1_only else None)
    if result is not None and result.points_rejected:
        message = rejection_message(result, BOUNDS)
        assert message.startswith(f"pathwatch rejected {result.points_rejected} data points: ")
