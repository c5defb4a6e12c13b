"""The report's analyses, pure functions of a study's records and measurements.

stats (within-seed comparisons, variance components, the R1 contrast's test and power), law (the
joint active-versus-total law over every run, with seed effects and bootstrap intervals),
frontier (compute multipliers against the law's dense frontier), isoflop (seed-adjusted IsoFLOP
parabolas), clark (Clark et al. 2022's implied theta), fits (power laws at equal tokens,
parabolas, intervals), scaling and scaling_report (the scaling section from those), krajewski
(the fine-grained MoE law, inside its range only), routing_health (normalised collapse),
specialisation (what experts specialise in), verdicts, claims and cost_claims (the literature's
expectations and their verdicts), reproduce (comparison with, and keeping of, a committed
reference).
"""
