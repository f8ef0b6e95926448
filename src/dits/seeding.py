"""Stable seed derivation: the same parts always give the same seed, on any machine and in any order.

Python's ``hash()`` is salted per process, so it must never seed anything that has to be reproducible.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (ints, strings)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF
