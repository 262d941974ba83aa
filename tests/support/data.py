"""Large payloads for the streaming tests: incompressible, and every piece different."""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Iterator

CHUNK = 256 * 1024


def chunks(total: int, seed: int = 1, size: int = CHUNK) -> Iterator[bytes]:
    """`total` bytes of incompressible data in `size`-byte pieces that all differ.

    (Each piece is the same random block behind its own index, so a piece lost, doubled
    or reordered changes the digest.)
    """
    base = random.Random(seed).randbytes(size)
    for i in range(total // size):
        yield i.to_bytes(8, "big") + base[8:]


@functools.cache
def digest(total: int, seed: int = 1, size: int = CHUNK) -> str:
    """The sha256 of chunks(total, seed, size)."""
    h = hashlib.sha256()
    for c in chunks(total, seed, size):
        h.update(c)
    return h.hexdigest()
