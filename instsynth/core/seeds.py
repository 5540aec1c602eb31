"""Seeds that do not depend on Python's hash randomisation, shared by generation, integration and copy-paste."""
from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a SHA-256 of the parts (independent of Python's hash randomisation)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
