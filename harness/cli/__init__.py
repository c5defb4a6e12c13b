"""The harness command: one verb per pipeline step, each runnable by hand.

    harness count models/configs/moe-s-e8k2.yaml [--json] [--seq-len N]
    harness match models/configs/dense-s.yaml --experts 8 --top-k 2 [--moe KEY=VALUE ...] [--out FILE]
    harness plan | data | tasks | train | measure | evaluate | routing | export | sample | report STUDY [...]
    harness --version

Every expected failure (a bad config, study or flag, a missing earlier step, a damaged file, a
full disk, a run too large for the machine) is one line, "harness VERB: error: ...", and exit
code 2; anything else is a defect and prints its traceback with a request to report it. The
first line of this docstring and EPILOG are what --help shows, so they stay plain text.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from tabulate import tabulate

from harness.core.errors import HarnessError, MissingStep, os_failure
from harness.study.runs import find_run, plan
from harness.study.spec import LOCAL_TASKS, Recipe, load_study
from harness.train import devices, run_lock
from harness.workflow.plan import cmd_plan
from models.accounting import summary
from models.config import ConfigError, Dispatch, MoEConfig, Routing, dump_config, load_config
from models.matching import OPTIONS, match_moe, non_defaults, parse_options

VERBS = ("count", "match", "plan", "data", "tasks", "train", "measure", "evaluate", "routing", "export", "sample")
VERBS += ("report",)
"""The verbs in pipeline order, as --help lists them."""
GPU_VERBS = ("train", "measure", "evaluate", "routing")
"""The verbs that run on a GPU when the study does: each takes its own device (harness.train.devices)."""
EPILOG = """\
The steps in pipeline order: count and match (model configs), then per study plan, data,
tasks, train, measure, evaluate, routing, export, sample (a run's text) and report.
snakemake runs a whole study; each step runs alone too, and "harness VERB --help" says what
it takes. An expected failure is one line, "harness VERB: error: ...", with exit code 2."""


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


def _results(args: argparse.Namespace, study) -> Path:
    return Path(args.results) / study.name


def _trained_run(args: argparse.Namespace, study):
    """(run, results folder, run folder) of --run, which must have finished training."""
    run = find_run(study, args.run)
    results = _results(args, study)
    run_dir = results / "runs" / run.run_id
    run_lock.reading(run_dir, run.run_id, args.verb)  # refused while the run trains
    if not (run_dir / "record.json").is_file():
        raise MissingStep(run_dir / "record.json", f"harness train {study.path} --run {run.run_id}", "not trained")
    from harness.core.io import read_json
    from harness.data.current import trained_on_other_data

    if refusal := trained_on_other_data([read_json(run_dir / "record.json")], results / "data" / "data.json"):
        raise HarnessError(refusal)
    return run, results, run_dir


def _trained_state(study, run, run_dir: Path) -> dict:
    """The verified final checkpoint of a trained run."""
    from harness.train.checkpoint import load_checkpoint

    train = f"harness train {study.path} --run {run.run_id}"
    return load_checkpoint(run_dir / "checkpoint.pt", train, f"`{train} --restart` trains it again")


def _checkpoint_kept(study, run, run_dir: Path) -> None:
    """Refuse a finished run whose checkpoint.pt is gone, saying how to get it back."""
    from harness.train.checkpoint import gone

    if (why := gone(run_dir / "checkpoint.pt", f"harness train {study.path} --run {run.run_id}")) is not None:
        raise HarnessError(why)


def _data_ready(results: Path, study, verify: bool = True) -> Path:
    """The study's prepared data folder, its shards checked against data.json (``verify``);
    refused when `harness data` has not run or its output is damaged."""
    from harness.data.prepare import read_meta, verify_shards

    data_dir, made_by = results / "data", f"harness data {study.path}"
    meta = read_meta(data_dir, made_by)
    if verify:
        verify_shards(data_dir, meta, made_by)
    return data_dir


def _up_to_date(out: Path, inputs: list[Path], args: argparse.Namespace) -> bool:
    """True (and says so) when ``out`` exists, is newer than every input and neither --force nor
    --out asks for it again: a step run by hand leaves an up-to-date output alone, as the
    pipeline does."""
    if getattr(args, "force", False) or getattr(args, "out", None) or not out.is_file():
        return False
    newest = max((p.stat().st_mtime for p in inputs if p.exists()), default=0.0)
    if out.stat().st_mtime < newest:
        return False
    print(f"{out}: nothing to do, it is up to date; --force does it again")
    return True


def _out_replaceable(args: argparse.Namespace, key: str) -> None:
    """Refuse, before any work, an --out that is a folder, or a file this verb did not write (a
    JSON object with ``key``) unless --force: a user's file is never overwritten unasked."""
    if not getattr(args, "out", None):
        return
    out = Path(args.out)
    if out.is_dir():
        raise ConfigError("--out", f"{out} is a folder; give the file to write, e.g. {out / (args.verb + '.json')}")
    if not out.is_file() or args.force:
        return
    try:
        ours = key in json.loads(out.read_bytes())
    except (ValueError, TypeError):
        ours = False
    if not ours:
        raise ConfigError(
            "--out", f"{out} exists and is not a harness {args.verb} result; it is left as it is: --force replaces it"
        )


def _cuda_visible(device: str | None) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device", "cuda requested but no CUDA device is visible")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def cmd_data(args: argparse.Namespace) -> int:
    from harness.data.prepare import prepare

    study = load_study(args.study)
    data_dir = _results(args, study) / "data"
    meta = prepare(study, data_dir, force=args.force)
    if meta.get("unchanged"):
        print(f"{data_dir}: nothing to do, the data is already prepared from this corpus with these settings")
    for split, info in meta["splits"].items():
        print(f"{split}: {info['documents']} documents, {info['bytes']:,} bytes, {info['tokens']:,} tokens")
    print(f"fingerprint {meta['fingerprint']}")
    return 0


def _layout(study, run):
    """This process's place in the run: torchrun's environment (one process without it), with
    the study's expert-parallel degree for an MoE where the world size allows it. Every rank
    checks the layout before the process group starts, so each refuses one that cannot work
    with the same line and exit code."""
    import os

    from harness.train.loop import pick_device
    from harness.train.parallel import check_world, from_env

    layout = from_env()
    expert = study.parallel.expert if run.model.moe is not None else 1
    if layout.world != study.parallel.data and layout.main:
        print(
            f"harness train: {layout.world} process(es) where the study's parallel.data is {study.parallel.data}: "
            "the run's numbers are the same up to floating-point sums, only its speed differs",
            file=sys.stderr,
        )
    batch = run.recipe.batch_size
    if batch % layout.world:
        fits = ", ".join(str(n) for n in range(1, batch + 1) if batch % n == 0)
        raise ConfigError(
            "--nproc-per-node",
            f"{layout.world} processes cannot split {run.run_id}'s batch of {batch} evenly; "
            f"start a number that divides it ({fits})",
            "torchrun",
        )
    if layout.distributed:  # the ranks torchrun started on this host, one device each
        here = int(os.environ.get("LOCAL_WORLD_SIZE", layout.world))
        check_world(here, pick_device(study).type, "--nproc-per-node", "torchrun", "start fewer processes per host")
    return from_env(expert if layout.world % expert == 0 else 1)


def cmd_train(args: argparse.Namespace) -> int:
    from harness.train.loop import NonFiniteLoss, Stopped
    from harness.train.run import AlreadyTrained, train

    study = load_study(args.study)
    run = find_run(study, args.run)
    results = _results(args, study)
    data_dir = _data_ready(results, study, verify=False)  # the trainer verifies the shards
    resume = (
        "restart"
        if args.restart
        else "previous"
        if args.from_previous
        else "changed"
        if args.restart_if_changed
        else "auto"
    )
    try:
        record = train(
            run,
            study,
            data_dir,
            results / "runs" / run.run_id,
            threads=args.threads,
            stop_after=args.stop_after,
            progress=not args.quiet,
            resume=resume,
            layout=(layout := _layout(study, run)),
        )
    except AlreadyTrained as done:
        r = done.record
        ckpt = results / "runs" / run.run_id / "checkpoint.pt"
        kept = "" if ckpt.is_file() else f"; its {ckpt.name} is gone (measure, evaluate and export need it)"
        if layout.main:
            print(
                f"{run.run_id}: nothing to do, already trained with this configuration and data "
                f"(val loss {r['final_val_loss']:.4f}){kept}; `--restart` trains it again"
            )
        return 0
    except Stopped as e:
        if layout.main:
            print(f"harness train: {e}", file=sys.stderr)
        return 3
    except NonFiniteLoss as e:
        print(f"harness train: error: {e}", file=sys.stderr)
        return 1
    if not layout.main:
        return 0
    print(
        f"{record['run_id']}: val loss {record['final_val_loss']:.4f}, {record['tokens']:,} tokens, "
        f"{record['train_seconds']:.1f} s, FLOPs spent / budget {record['flops_spent_over_budget']:.4f}"
    )
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    import torch

    from harness.core.io import write_json
    from harness.measure.throughput import MeasureSettings, measure
    from harness.train.loop import pick_device
    from harness.train.precision import resolve

    settings = MeasureSettings(
        **{k: v for k, v in vars(args).items() if k in MeasureSettings.__dataclass_fields__ and v is not None}
    )
    _out_replaceable(args, "train")
    if args.config:
        _cuda_visible(args.device)
        cfg, state, device, seed = load_config(args.config), None, torch.device(args.device or "cpu"), 0
        # As a recipe with these settings would train it (dtype auto: bf16 on CUDA, fp32 on a CPU).
        precision = resolve(Recipe(dtype=args.dtype or "auto", compile=args.compile), device)
        out = Path(args.out or f"results/measure/{cfg.name}.json")
        label = {"config": args.config}
    else:
        if not args.study or not args.run:
            raise ConfigError("(command line)", "give STUDY --run RUN_ID, or --config MODEL.yaml")
        if args.dtype or args.compile:
            raise ConfigError("--dtype/--compile", "a run is measured as it trained; these go with --config")
        study = load_study(args.study)
        run, _, run_dir = _trained_run(args, study)
        if _up_to_date(run_dir / "measure.json", [run_dir / "record.json"], args):
            return 0
        device = pick_device(study)
        cfg, state, seed = run.model, _trained_state(study, run, run_dir)["model"], run.seed
        precision = resolve(run.recipe, device)
        # The run's own step shape (unless given): what it trained with, and compiled for.
        as_trained = {"seq_len": run.recipe.seq_len}
        if getattr(args, "batch_size", None) is None:
            as_trained["batch_size"] = run.recipe.batch_size
        settings = MeasureSettings(**(settings.__dict__ | as_trained))
        out = Path(args.out) if args.out else run_dir / "measure.json"
        label = {"study": study.name, "run_id": run.run_id, "checkpoint": str(run_dir / "checkpoint.pt")}
    _set_threads(args.threads)
    from harness.train.resources import check_memory

    check_memory(cfg, settings.batch_size, settings.seq_len, device, "harness measure")
    result = label | measure(cfg, device, settings, state, seed, precision)
    write_json(out, result)
    t, m = result["train"], result["mfu"]["conventions"]
    print(
        f"{cfg.name} on {result['device_name']}: train {t['tokens_per_s_median']:,.0f} tokens/s "
        f"[{t['tokens_per_s_min']:,.0f}, {t['tokens_per_s_max']:,.0f}], "
        f"prefill {result['prefill']['tokens_per_s_median']:,.0f}, "
        f"decode b1 {result['decode_batch1']['tokens_per_s_median']:,.0f}, "
        f"detailed FLOPs at {m['detailed']['fraction_of_measured_matmul']:.1%} of the measured matmul -> {out}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from harness.evaluate.export import NotExportable, export, hf_family

    study = load_study(args.study)
    run, results, run_dir = _trained_run(args, study)
    out = Path(args.out or results / "export" / run.run_id)
    tokenizer = results / "data" / "tokenizer.json"
    try:
        hf_family(run.model)  # a model with no faithful class is refused before anything is read
        if not tokenizer.is_file():
            raise MissingStep(tokenizer, f"harness data {study.path}")
        state = _trained_state(study, run, run_dir)["model"]
        source = f"study {study.name}, run {run.run_id}"
        cls = export(run.model, state, tokenizer, out, source=source)
    except NotExportable as e:
        message = " ".join(str(e).split())  # one line
        print(f"harness export: error: {message}", file=sys.stderr)
        return 2
    print(f"{run.run_id} -> {out} ({cls})")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    from harness.data.tasks import write_tasks

    study = load_study(args.study)
    data_dir = _data_ready(_results(args, study), study)
    if _up_to_date(data_dir / "tasks" / "tasks.json", [data_dir / "data.json"], args):
        return 0
    try:
        meta = write_tasks(data_dir, study.eval, study.recipe.seq_len, made_by=f"harness data {study.path}")
    except ValueError as e:
        print(f"harness tasks: error: {e}", file=sys.stderr)
        return 1
    ppl, mc = meta["tasks"]["heldout_ppl"], meta["tasks"]["heldout_code_mc"]
    print(
        f"{data_dir / 'tasks'}: heldout_ppl {ppl['documents']} documents ({ppl['bytes']:,} bytes), "
        f"heldout_code_mc {mc['questions']} questions x {mc['choices']} choices, from the {meta['split']} split"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _out_replaceable(args, "tasks")
    study = load_study(args.study)
    if args.download:
        study = replace(study, eval=replace(study.eval, download=True))
    if not study.eval.download:
        from harness.evaluate.lm_eval_run import go_offline

        go_offline()  # before anything imports datasets or huggingface_hub
    from harness.core.io import read_json, write_json
    from harness.core.provenance import provenance
    from harness.evaluate.lm_eval_run import evaluate_run

    run, results, run_dir = _trained_run(args, study)
    _cuda_visible(args.device)
    tasks_dir = results / "data" / "tasks"
    if _up_to_date(run_dir / "eval.json", [run_dir / "record.json", tasks_dir / "tasks.json"], args):
        return 0
    _checkpoint_kept(study, run, run_dir)
    if any(t in LOCAL_TASKS for t in study.eval.tasks):
        read_json(tasks_dir / "tasks.json", made_by=f"harness tasks {study.path}")  # present and whole
    _set_threads(args.threads)
    result = evaluate_run(run_dir, tasks_dir, study.eval, device=args.device, dtype=args.dtype)
    import torch

    out = Path(args.out) if args.out else run_dir / "eval.json"
    write_json(
        out,
        {"run_id": run.run_id, "study": study.name}
        | result
        | {"provenance": provenance(torch.device(result["device"]))},
    )
    for task, metrics in result["tasks"].items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, float) and not k.endswith("_stderr")}
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))
    for task, reason in result["not_run"].items():
        print(f"{task}: not run: {reason}", file=sys.stderr)
    print(f"-> {out}")
    return 0


def cmd_routing(args: argparse.Namespace) -> int:
    from harness.analysis.specialisation import routing_analysis
    from harness.core.io import write_json

    _out_replaceable(args, "moe")
    study = load_study(args.study)
    run, results, run_dir = _trained_run(args, study)
    _cuda_visible(args.device)
    if _up_to_date(run_dir / "routing.json", [run_dir / "record.json", results / "data" / "data.json"], args):
        return 0
    if run.model.moe is not None:  # a dense run has no routing: its weights are not read
        _checkpoint_kept(study, run, run_dir)
    data_dir = _data_ready(results, study)
    _set_threads(args.threads)
    result = routing_analysis(run_dir, data_dir, device=args.device, max_tokens=args.max_tokens)
    out = Path(args.out) if args.out else run_dir / "routing.json"
    write_json(out, {"run_id": run.run_id, "study": study.name} | result)
    if not result["moe"]:
        print(f"{run.run_id}: dense, no routing to analyse -> {out}")
        return 0
    s = result["summary"]
    topic = "unknown" if s["topic_nmi_excess"] is None else f"{s['topic_nmi_excess']:.3f}"
    print(
        f"{run.run_id}: {result['tokens']:,} {result['split']} tokens, excess NMI expert~category "
        f"{s['category_nmi_excess']:.3f}, expert~topic {topic}: {s['specialises_by']} -> {out}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.report.build import write_report

    study = load_study(args.study)
    results = _results(args, study)
    if args.reference:
        results = _keep_reference(args, study, results)
    # The pipeline's micro-benchmark, as the report rule passes it, unless another is named.
    microbench = Path(args.microbench) if args.microbench else results / "microbench" / "moe_ffn.json"
    path = write_report(study, results, microbench if microbench.is_file() else None)
    if args.print:
        print(path.read_text())
    else:
        print(path)
    return 0


def _keep_reference(args: argparse.Namespace, study, results: Path) -> Path:
    """--reference: copy the finished study's small records into
    <results root>/reference/<device class>/<study>/ and return that folder, where the report is
    then built from the copy alone."""
    from harness.analysis.reproduce import device_class, keep_reference, reference_folder, require_finished
    from harness.core.io import read_json

    run_ids = [run.run_id for run in plan(study)]
    require_finished(results, run_ids)
    from harness.core.remedy import run_file

    first = results / "runs" / run_ids[0] / "record.json"
    cls = device_class(read_json(first, remedy=run_file(first, study.path)))
    dest = reference_folder(Path(args.results), study.name, cls)
    copied = keep_reference(results, run_ids, dest)
    if args.microbench:  # the named micro-benchmark becomes the reference's
        from harness.core.io import atomic_write

        (dest / "microbench").mkdir(parents=True, exist_ok=True)
        atomic_write(
            dest / "microbench" / "moe_ffn.json", lambda tmp: tmp.write_bytes(Path(args.microbench).read_bytes())
        )
        args.microbench = None
    print(f"# kept {len(copied)} records of {len(run_ids)} runs in {dest}", file=sys.stderr)
    return dest


def _at_least(low: int):
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


POSITIVE = _at_least(1)


def version_text() -> str:
    """The package version, and the commit when run from a git checkout."""
    try:
        version = importlib.metadata.version("moe-harness")
    except importlib.metadata.PackageNotFoundError:
        from harness import __version__ as version
    text = f"harness (moe-harness) {version}"
    commit = _checkout_commit()
    return f"{text}, commit {commit}" if commit else text


def _checkout_commit() -> str | None:
    """Short commit (+ "-dirty") of the checkout this package runs from, or None."""
    from harness.core.provenance import git_state

    state = git_state()
    if state["commit"] is None:
        return None
    return state["commit"][:12] + ("-dirty" if state["dirty"] else "")


class _Version(argparse.Action):
    """--version, worked out only when asked for (it may call git)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _moe_default(name: str):
    return MoEConfig.__dataclass_fields__[name].default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, help="print the version (and commit, in a checkout) and exit")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", title="verbs, in pipeline order")
    add = {}

    def verb(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        p.set_defaults(func=func)
        add[name] = p
        return p

    def study_verb(name: str, help: str, func) -> argparse.ArgumentParser:
        p = verb(name, help, func)
        p.add_argument("study", help="a study name in workflows/studies/ or a path to a study YAML")
        p.add_argument("--results", default="results", help="results root (default: results)")
        return p

    p = verb("count", "total/active parameters and FLOPs per token of model configs", cmd_count)
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml", help="model configs, e.g. models/configs/*.yaml")
    p.add_argument("--json", action="store_true", help="exact numbers as JSON")
    p.add_argument("--seq-len", type=POSITIVE, default=None, help="context for attention FLOPs (default max_seq_len)")

    p = verb("match", "derive the compute-matched MoE of a dense config", cmd_match)
    p.add_argument("dense", metavar="DENSE.yaml", help="the dense model config to match")
    p.add_argument("--experts", type=POSITIVE, required=True, metavar="E", help="E, routed experts")
    p.add_argument("--top-k", type=POSITIVE, required=True, metavar="K", help="k, routed experts per token")
    p.add_argument(
        "--shared", type=_at_least(0), default=0, metavar="S", help="shared (always-active) experts (default 0)"
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

    p = study_verb("plan", "the run matrix of a study: sizes, tokens, what is done, time and disk", cmd_plan)
    p.add_argument("--json", action="store_true", help="one object per run, as JSON")
    p.add_argument("--device", choices=["cpu", "cuda"], help="estimate for this device (default: the one the runs use)")
    p.add_argument("--gpu", default="H100", help="GPU to assume when none is visible (default H100)")
    p.add_argument(
        "--gpus",
        type=POSITIVE,
        default=None,
        help="GPUs the runs share, parallel.data of them per run (default: one run's, parallel.data)",
    )
    p.add_argument("--mfu", type=_fraction, default=0.4, help="assumed model FLOP utilisation on a GPU (default 0.4)")

    p = study_verb("data", "read the corpus, train the tokenizer, write token shards", cmd_data)
    p.add_argument("--force", action="store_true", help="write the data again even when it is unchanged")

    p = study_verb("tasks", "write the offline lm-eval tasks built from the held-out split", cmd_tasks)
    p.add_argument("--force", action="store_true", help="write the tasks again even when they are up to date")

    p = study_verb("train", "train one run of a study (resumes from its checkpoint)", cmd_train)
    p.add_argument("--run", required=True, help="run id, as harness plan lists them")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument(
        "--stop-after",
        type=POSITIVE,
        default=None,
        help="stop after this step, leaving a checkpoint: exit code 3 "
        "(python -m harness.launch passes it on from torchrun's ranks)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--restart", action="store_true", help="discard the run's checkpoints and start over")
    resume.add_argument(
        "--from-previous", action="store_true", help="resume from checkpoint.prev.pt (when checkpoint.pt is damaged)"
    )
    resume.add_argument(
        "--restart-if-changed",
        action="store_true",
        help="start over if the run's checkpoint or record is of another configuration, else resume",
    )

    p = verb("measure", "throughput, MFU, memory and GPU energy of a run or a bare config", cmd_measure)
    p.add_argument("study", nargs="?", help="a study name or path (with --run)")
    p.add_argument("--run", help="run id whose checkpoint to measure")
    p.add_argument("--config", help="measure this model config with random weights instead")
    p.add_argument("--device", choices=["cpu", "cuda"], help="with --config (default cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], help="with --config, as recipe.dtype (auto)")
    p.add_argument("--compile", action="store_true", help="with --config: torch.compile the training step")
    p.add_argument("--results", default="results", help="results root (default: results)")
    p.add_argument("--out", help="where to write measure.json (default: the run's folder)")
    p.add_argument("--batch-size", dest="batch_size", type=POSITIVE, help="sequences per step (default: the run's)")
    p.add_argument("--seq-len", dest="seq_len", type=POSITIVE, help="tokens per sequence (default: the run's)")
    p.add_argument("--windows", type=_at_least(5), help="timed windows (>= 5)")
    p.add_argument("--threads", type=POSITIVE, help="torch CPU threads (default: all)")
    p.add_argument(
        "--force",
        action="store_true",
        help="measure again even when measure.json is up to date; replace any --out file",
    )

    p = study_verb("evaluate", "evaluate a trained run with lm-eval on the study's tasks (eval.json)", cmd_evaluate)
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when visible")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument("--out", help="where to write eval.json (default: the run's folder)")
    p.add_argument("--download", action="store_true", help="let lm-eval fetch datasets (overrides eval.download)")
    p.add_argument(
        "--force", action="store_true", help="evaluate again even when eval.json is up to date; replace any --out file"
    )

    p = study_verb("routing", "what a trained MoE run's experts specialise in: token category or topic", cmd_routing)
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--threads", type=POSITIVE, default=None, help="torch CPU threads")
    p.add_argument("--max-tokens", dest="max_tokens", type=POSITIVE, default=65_536, help="held-out tokens to route")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: CUDA when visible")
    p.add_argument("--out", help="where to write routing.json (default: the run's folder)")
    p.add_argument(
        "--force",
        action="store_true",
        help="analyse again even when routing.json is up to date; replace any --out file",
    )

    p = study_verb("export", "write a trained run as a Hugging Face model directory", cmd_export)
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--out", help="output directory (default results/<study>/export/<run>)")

    from harness.evaluate import sample  # the verb's own module: its arguments and its command

    sample.add_arguments(study_verb("sample", sample.HELP, sample.cmd_sample))

    p = study_verb("report", "write the study report from the run records", cmd_report)
    p.add_argument("--print", action="store_true", help="print the report instead of its path")
    p.add_argument(
        "--reference",
        action="store_true",
        help="keep the finished study as its reference: copy each run's small records (no checkpoints or "
        "data) into RESULTS/reference/DEVICE/STUDY/ and write the report there from them; "
        "--results RESULTS/reference/DEVICE rebuilds it later",
    )
    p.add_argument(
        "--microbench",
        help="pytest-benchmark JSON to include (default: the study's results/<study>/microbench/moe_ffn.json, if any)",
    )
    assert tuple(add) == VERBS, "verbs are added in pipeline order"
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # A GPU job of the workflow (MOE_HARNESS_GPUS) gets devices of its own, before CUDA starts.
        with devices.pinned(devices.requested() if args.verb in GPU_VERBS else 0), run_lock.released():
            return args.func(args)
    except (ConfigError, HarnessError) as e:
        message = " ".join(str(e).split())  # one line, whatever a library put in the message
        print(f"harness {args.verb}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harness {args.verb}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Read-only, no permission, no space, a file where a folder belongs: the OS's refusal,
        # or a library's error that carries its text, is one line too.
        if (failure := os_failure(e)) is not None:
            print(f"harness {args.verb}: error: {' '.join(str(failure).split())}", file=sys.stderr)
            return 2
        traceback.print_exc()
        print(
            f"harness {args.verb}: internal error: this is a defect in moe-harness, not in your input; "
            "please report it with the command line and the traceback above",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
