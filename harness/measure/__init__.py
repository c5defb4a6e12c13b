"""What a trained run costs to run, measured honestly: throughput, MFU, memory and energy
(throughput), each figure checked by the plausibility rules (plausibility)."""
