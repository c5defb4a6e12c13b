"""How a CPU training process's heap treats the memory a step frees.

glibc's malloc (mallopt(3)) serves a block above its mapping threshold from a mapping of its own
and unmaps it when freed; the threshold starts at 128 KiB and rises, as such blocks are freed, up
to 32 MiB. It also gives back the heap's free top once that exceeds the trim threshold (twice the
mapping threshold). A training step frees its activations and allocates the same sizes again in
the next step, so by default part of them is unmapped or trimmed and mapped again every step, and
the kernel zero-fills each page on its first touch: dense-d64 (bf16, compiled, one thread, batch
16 x 128) took 4,000-5,800 page faults a step. In a virtual machine whose memory the hypervisor
backs on the guest's first touch, a page the guest never used costs more again (about 60% more on
the reference host), so the same run trains slower on a fresh machine than on one that has run
for a while, and a measurement taken later disagrees with it.

:func:`keep_freed_memory` fixes the mapping threshold at its ceiling and turns trimming off, so
what a step frees stays in the heap for the next. On the reference host (three rounds, default
and kept alternating, medians) dense-d64 went from 74.5 to 66.7 ms a step with no page faults left,
its E16 k2 twin from 97.6 to 85.1 ms with about 420 left, at about the same peak resident memory
(kept 494 and 971 MiB, default 478 and 976 MiB). ``harness train`` and ``harness measure`` call it on a CPU
before they build a model; :func:`describe` says in a record's provenance what the process's heap
did. Blocks above 32 MiB are still mapped one by one.
"""

from __future__ import annotations

import ctypes

MAPPING_THRESHOLD = 32 << 20
"""Bytes: glibc's ceiling for the dynamic mapping threshold (DEFAULT_MMAP_THRESHOLD_MAX, 64-bit)."""
NO_TRIM = 2**31 - 1
"""The largest trim threshold mallopt takes (an int): the free top of the heap is kept."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers (glibc malloc.h)

_state = "glibc's default: freed large blocks unmapped, the heap's free top trimmed"


def keep_freed_memory() -> bool:
    """Keep what the process frees for its next allocations (see the module docstring); False,
    with nothing changed, where there is no glibc."""
    global _state
    try:
        libc = ctypes.CDLL("libc.so.6")
        kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, MAPPING_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, NO_TRIM)
        )
    except (OSError, AttributeError):
        _state = "not glibc: the allocator's own default"
        return False
    if kept:
        _state = f"freed memory kept: blocks up to {MAPPING_THRESHOLD >> 20} MiB from the heap, never trimmed"
    return kept


def describe() -> str:
    """What this process's heap does with freed memory, for a record's provenance."""
    return _state
