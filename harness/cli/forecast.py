"""``harness forecast STUDY --law-from FOLDER``: what the joint law fitted to another study's runs
predicts for this study's registered primary gain, under each form of the law, with the power of
the registered test at each forecast (``harness.analysis.forecast``). Run it before registering:
its numbers go into the study file's ``registration.forecast``, and the report scores them.

    harness forecast cpu-frontier --law-from results/reference/cpu/cpu --sd 0.0306
"""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.analysis.forecast import TARGET_POWER, forecast_contrast
from harness.cli.common import POSITIVE, fraction
from harness.core.errors import HarnessError
from harness.study.pool import folder_records
from harness.study.spec import load_study

HELP = "a joint law's forecast of a study's registered primary gain, before its runs"
STUDY = True


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--law-from", required=True, help="a results folder (runs/*/record.json) to fit the law to")
    p.add_argument("--sd", type=float, required=True, help="planning sd of the paired gains, nats")
    p.add_argument("--confidence", type=fraction, default=0.9, help="coverage of the forecast interval (0.9)")
    p.add_argument("--bootstrap", type=POSITIVE, default=None, help="refits of each law (default: the report's)")


def run(args: argparse.Namespace) -> int:
    study = load_study(args.study)
    if study.registration is None or study.registration.primary is None:
        raise HarnessError(f"{study.path}: registration.primary: none; a forecast is of a registered contrast")
    if not args.sd > 0:
        raise HarnessError(f"--sd {args.sd}: the planning sd must be positive")
    records = folder_records(Path(args.law_from))
    c = study.registration.primary
    print(
        f"{study.name}: {c.moe} against {c.dense} at {c.budget:g} FLOPs over {c.seeds} seeds; the law fitted to "
        f"{len(records)} runs of {args.law_from}; planning sd {args.sd:g} nats"
    )
    rows = forecast_contrast(records, study, args.sd, args.confidence, args.bootstrap)
    for r in rows:
        if r["gain"] is None:
            print(f"  {r['law']:6} {r['label']}: not fitted ({r['reason']})")
            continue
        need = r["seeds_needed"]
        print(
            f"  {r['law']:6} {r['label']}: gain {r['gain']:+.4f} nats, {args.confidence:.0%} interval "
            f"[{r['interval'][0]:+.4f}, {r['interval'][1]:+.4f}] ({r['draws']} refits); power at it with "
            f"{c.seeds} seeds {r['power']:.3f}; {TARGET_POWER:.0%} power needs "
            f"{need if need is not None else 'more than 200'} seeds"
        )
    return 0
