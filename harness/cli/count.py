"""``harness count CONFIG.yaml ...``: total and active parameters and training FLOPs per token of
model configs, as a table or (``--json``) the exact numbers.

    harness count models/configs/moe-s-e8k2.yaml [--json] [--seq-len N]
"""

from __future__ import annotations

import argparse
import json

from tabulate import tabulate

from harness.cli.common import POSITIVE
from models.accounting import summary
from models.config import load_config

HELP = "total/active parameters and FLOPs per token of model configs"
STUDY = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml", help="model configs, e.g. models/configs/*.yaml")
    p.add_argument("--json", action="store_true", help="exact numbers as JSON")
    p.add_argument("--seq-len", type=POSITIVE, default=None, help="context for attention FLOPs (default max_seq_len)")


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def run(args: argparse.Namespace) -> int:
    rows = [summary(load_config(path), args.seq_len) for path in args.configs]
    if args.json:
        print(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
        return 0
    table = []
    for s in rows:
        p, f = s["params"], s["training_flops_per_token"]
        routed = "-" if s["experts"] is None else f"E{s['experts']} k{s['top_k']}"
        table.append(
            [
                s["name"],
                routed,
                _human(p["total"]),
                _human(p["active"]),
                _human(p["total_non_embedding"]),
                _human(p["active_non_embedding"]),
                f"{s['active_fraction']:.3f}",
                _human(f["6N_active"]),
                _human(f["detailed"]),
                s["n_ctx"],
            ]
        )
    headers = [
        "model",
        "experts",
        "total",
        "active",
        "total non-emb",
        "active non-emb",
        "active/total",
        "train FLOPs/tok 6N_active",
        "train FLOPs/tok detailed",
        "n_ctx",
    ]
    print(tabulate(table, headers=headers))
    return 0
