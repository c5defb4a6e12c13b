"""Training one run to its FLOP budget: the loop (loop), the layout of a run over processes
(parallel; launch for torchrun), checkpoints (checkpoint), precision and compilation (precision),
progress logs (progress), the training loss a record carries (train_loss), a lock per run
folder (run_lock), memory and devices (resources, devices) and the GPU energy meter (energy)."""
