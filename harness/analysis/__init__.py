"""The report's analyses, pure functions of a study's records and measurements.

stats (seed statistics, seed noise), fits (power laws, parabolas, intervals), scaling and
scaling_report (dense fits, dense-equivalent sizes, multipliers, IsoFLOP), krajewski (the
fine-grained MoE law), routing_health (collapse), specialisation (what experts specialise in),
claims (the literature's expectations and their verdicts), reproduce (comparison with a
committed reference).
"""
