"""What a claim's verdict can be, and the record of one (``harness.analysis.claims``,
``harness.analysis.cost_claims``).

A rule must be able to say yes, no and "inconclusive":
``inconclusive`` is a test that ran and decided neither way; ``not enough data`` is a test that
could not run (too few seeds, sizes or measured runs).
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED, NOT_SUPPORTED, NO_DATA = "supported", "not supported", "not enough data"
INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class Claim:
    key: str
    claim: str
    source: str
    verdict: str
    evidence: str
    caveat: str = ""
