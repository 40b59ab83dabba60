"""Where an executable path looks like an intruder's: the order summaries list keys in.

A summary that stands in for many alerts (a new-key cap, the per-tick cap) lists the keys it
covers, at most a bounded number: the ones an analyst must not miss come first, whatever their
order in the store. Locations are the usual drop sites of implants: world-writable or memory-backed
directories, hidden directories and binaries deleted after their start (the kernel reports the
path with " (deleted)").
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import TypeVar

_DROP_SITES = ("/tmp/", "/var/tmp/", "/dev/shm/", "/run/")
_HIDDEN = re.compile(r"(^|/)\.[^/.][^/]*")
_T = TypeVar("_T")


def suspicion(path: str) -> int:
    """0 (most suspicious) to 3 (an ordinary location); a higher count of signs ranks first."""
    signs = 0
    if path.startswith(_DROP_SITES):
        signs += 1
    if _HIDDEN.search(path):
        signs += 1
    if path.endswith(" (deleted)"):
        signs += 1
    return 3 - signs


def most_suspicious_first(
    items: Iterable[_T], path_of: Callable[[_T], str], limit: int
) -> list[_T]:
    """Up to `limit` items, suspicious paths first, then by path (stable, deterministic)."""
    return sorted(items, key=lambda item: (suspicion(path_of(item)), path_of(item)))[:limit]


_BIDI = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI", "LRM", "RLM", "ALM"}


def display_safe(text: str) -> str:
    """`text` with control and bidirectional-override characters escaped (\\x1b, \\u202e), so
    that a crafted path cannot rewrite the message a person reads. Alert `fields` keep the
    exact value; only prose built for people goes through this."""
    out = []
    for ch in text:
        if unicodedata.category(ch) in ("Cc", "Cf") or unicodedata.bidirectional(ch) in _BIDI:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
