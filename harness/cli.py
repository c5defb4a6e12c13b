"""The ``harness`` command: one verb per pipeline step, each runnable by hand.

harness count models/configs/moe-s-e8k2.yaml [--json] [--seq-len N]
harness match models/configs/dense-s.yaml --experts 8 --top-k 2 [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tabulate import tabulate

from models.accounting import summary
from models.config import ConfigError, dump_config, load_config
from models.matching import match_moe


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def cmd_count(args: argparse.Namespace) -> int:
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


def cmd_match(args: argparse.Namespace) -> int:
    dense = load_config(args.dense)
    options = {}
    if args.routing:
        options["routing"] = args.routing
    if args.dispatch:
        options["dispatch"] = args.dispatch
    try:
        cfg, report = match_moe(
            dense,
            experts=args.experts,
            top_k=args.top_k,
            shared_experts=args.shared,
            granularity=args.granularity,
            name=args.name,
            **options,
        )
    except ConfigError as e:
        raise e.with_source("(command line)") from None
    text = dump_config(cfg)
    for line in report.lines():
        print(f"# {line}", file=sys.stderr)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)
        print(f"# wrote {out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True)

    p = sub.add_parser("count", help="total/active parameters and FLOPs per token of model configs")
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml")
    p.add_argument("--json", action="store_true", help="exact numbers as JSON")
    p.add_argument("--seq-len", type=int, default=None, help="context for attention FLOPs (default max_seq_len)")
    p.set_defaults(func=cmd_count)

    p = sub.add_parser("match", help="derive the compute-matched MoE of a dense config")
    p.add_argument("dense", metavar="DENSE.yaml")
    p.add_argument("--experts", type=int, required=True, help="E, routed experts")
    p.add_argument("--top-k", type=int, required=True, help="k, routed experts per token")
    p.add_argument("--shared", type=int, default=0, help="shared (always-active) experts")
    p.add_argument("--granularity", type=int, default=None, help="G = d_ff / d_expert; must equal k + shared")
    p.add_argument("--routing", default=None, help="softmax-topk, topk-softmax, noisy-topk or sigmoid-bias")
    p.add_argument("--dispatch", default=None, help="dropless or capacity")
    p.add_argument("--name", default=None, help="model id (default <dense>-e<E>k<k>)")
    p.add_argument("--out", default=None, help="write the YAML here instead of stdout")
    p.set_defaults(func=cmd_match)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"harness {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
