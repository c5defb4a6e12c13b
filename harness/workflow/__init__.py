"""What the Snakefile and ``harness plan`` know of the whole pipeline: which study and which runs
are current or stale, and the retraining guard (snakefile); finished runs reused across studies
(reuse); the disk a study needs (disk); how long its stages take (estimate, probe, stages); and
the plan itself (plan)."""
