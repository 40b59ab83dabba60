# The optional C accelerator (_wirescan.c): one pass over an ExportMetricsServiceRequest.
def scan(
    data: bytes, /
) -> tuple[list[bytes], set[bytes], int, int, int, int, bytes, bytes] | None: ...
