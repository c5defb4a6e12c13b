"""moe-harness: the apparatus that builds, trains, measures, evaluates and reports on matched
dense and Mixture-of-Experts transformers. ``harness --help`` lists the steps.

The packages are the pipeline, in order; a module imports only from its own stage and earlier
ones (``tests/test_package_layout.py`` checks it):

    core/      errors, atomic files, remedies, provenance, host load: what every stage shares
    study/     a study file (spec), its run matrix and run identities (runs), its registration
    data/      corpus -> tokenizer -> token shards (prepare), corpus identity, lm-eval tasks
    train/     the training loop, the parallel layout, checkpoints, precision, devices, energy
    measure/   throughput, MFU, memory and energy of a trained run; plausibility of each figure
    evaluate/  lm-eval (model, plugin, run), Hugging Face export, sampling a run's text
    analysis/  pure functions of the records: statistics, the joint law, claims, reproduction
    report/    report.md, tables, figures, report.html, the CI summary, the browser check
    workflow/  what the Snakefile and ``harness plan`` know of the whole: run states, retraining
               guard, reuse across studies, disk, time estimates
    tools/     make gpu-check, the wheelhouse, a venv over a host's torch
    cli/       the ``harness`` command: one module per verb

``python -m harness.launch`` (torchrun, harness.train.launch), ``python -m harness.devices``
(harness.train.devices) and ``python -m harness.reuse`` (harness.workflow.reuse) are the commands
run as modules.
"""

__version__ = "0.1.0"
