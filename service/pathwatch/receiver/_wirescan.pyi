from types import NotImplementedType

# The optional C accelerator (_wirescan.c): one pass over an ExportMetricsServiceRequest.
def scan(
    data: bytes, /
) -> tuple[list[bytes], set[bytes], int, int, int, int, bytes, bytes] | None: ...
def classify(
    resources: list[bytes],
    entries: dict[int, int],
    keys: dict[int, tuple[bytes, ...]],
    minute: int,
    earliest_ms: int,
    previous: int,
    with_points: bytes,
    /,
) -> tuple[int, list[int], list[tuple[int, tuple[bytes, ...]]]] | NotImplementedType | None: ...
