"""``harness match DENSE.yaml --experts E --top-k K``: the compute-matched MoE of a dense model
config, written as YAML to stdout or ``--out``, with how it was matched on stderr.

    harness match models/configs/dense-s.yaml --experts 8 --top-k 2 [--moe KEY=VALUE ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.cli.common import POSITIVE, at_least
from models.config import ConfigError, Dispatch, MoEConfig, Routing, dump_config, load_config
from models.matching import OPTIONS, match_moe, non_defaults, parse_options

HELP = "derive the compute-matched MoE of a dense config"
STUDY = False


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dense", metavar="DENSE.yaml", help="the dense model config to match")
    p.add_argument("--experts", type=POSITIVE, required=True, metavar="E", help="E, routed experts")
    p.add_argument("--top-k", type=POSITIVE, required=True, metavar="K", help="k, routed experts per token")
    p.add_argument(
        "--shared", type=at_least(0), default=0, metavar="S", help="shared (always-active) experts (default 0)"
    )
    p.add_argument(
        "--granularity", type=POSITIVE, default=None, metavar="G", help="G = d_ff / d_expert; must equal k + shared"
    )
    p.add_argument(
        "--routing",
        choices=[r.value for r in Routing],
        help=f"how router scores pick experts (default {_moe_default('routing').value})",
    )
    p.add_argument(
        "--dispatch",
        choices=[d.value for d in Dispatch],
        help=f"capacity drops tokens past each expert's capacity (default {_moe_default('dispatch').value})",
    )
    p.add_argument(
        "--load-balance-coef",
        type=float,
        metavar="ALPHA",
        help=f"weight of the Switch load-balance loss (default {_moe_default('load_balance_coef')})",
    )
    p.add_argument(
        "--z-loss-coef",
        type=float,
        metavar="C",
        help=f"weight of the router z-loss (default {_moe_default('z_loss_coef')})",
    )
    p.add_argument(
        "--moe",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any further MoE field, as in a study's moe: mapping, the value read as YAML; repeatable. "
        f"Keys: {', '.join(OPTIONS)}",
    )
    p.add_argument("--name", default=None, help="model name (default: the --out file's stem, else <dense>-e<E>k<k>)")
    p.add_argument("--out", default=None, metavar="FILE", help="write the YAML here instead of stdout")
    p.add_argument("--force", action="store_true", help="with --out: replace a file that holds something else")


def run(args: argparse.Namespace) -> int:
    dense = load_config(args.dense)
    flags = {
        "routing": args.routing,
        "dispatch": args.dispatch,
        "load_balance_coef": args.load_balance_coef,
        "z_loss_coef": args.z_loss_coef,
    }
    # Named after the file it is written to: models/configs/NAME.yaml holds model NAME.
    name = args.name or (Path(args.out).stem if args.out else None)
    try:
        options = parse_options(args.moe, {k: v for k, v in flags.items() if v is not None})
        cfg, report = match_moe(
            dense,
            experts=args.experts,
            top_k=args.top_k,
            shared_experts=args.shared,
            granularity=args.granularity,
            name=name,
            **options,
        )
    except ConfigError as e:
        raise e.with_source("(command line)") from None
    text = dump_config(cfg)
    for line in report.lines():
        print(f"# {line}", file=sys.stderr)
    changed = non_defaults(cfg.moe)
    if changed:
        shown = ", ".join(f"{k} {v} (default {d})" for k, (v, d) in changed.items())
        print(f"# moe fields not at MoEConfig's defaults: {shown}", file=sys.stderr)
    else:
        coefs = ", ".join(f"{k} {getattr(cfg.moe, k)}" for k in OPTIONS if k.endswith("_coef"))
        print(f"# moe fields all at MoEConfig's defaults ({coefs}); --moe KEY=VALUE sets any", file=sys.stderr)
    if args.out:
        from harness.core.io import write_text

        out = Path(args.out)
        if out.is_dir():
            raise ConfigError("--out", f"{out} is a folder; give the file to write, e.g. {out / (cfg.name + '.yaml')}")
        if out.is_file() and not args.force and out.read_bytes() != text.encode():
            raise ConfigError(
                "--out", f"{out} exists and holds something else; it is left as it is: --force replaces it"
            )
        write_text(out, text)
        print(f"# wrote {out} (model {cfg.name})", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _moe_default(name: str):
    return MoEConfig.__dataclass_fields__[name].default
