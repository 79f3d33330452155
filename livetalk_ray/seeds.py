"""Named random streams: each kind of random draw in a run gets its own seed from the run's base seed.

`seed_of(base, "dmd.rollout", i)` is the seed of rollout i's noise, `seed_of(base, "dmd.generator", i)` that of
generator step i's, and so on: a 63-bit hash of the base seed, the stream's name and its indices, so two
streams (or two indices of one stream) never share a seed the way `base + 1` and `2 * i + 1` arithmetic did.
"""

from __future__ import annotations

import hashlib


def seed_of(base: int, stream: str, *index: int) -> int:
    """The seed of draw `index` of the named `stream` in a run seeded with `base` (stable across processes)."""
    key = "/".join([str(int(base)), stream, *(str(int(i)) for i in index)])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 2**63
