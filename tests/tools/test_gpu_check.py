"""make gpu-check's structure on the CPU (harness/tools/gpu_check.py): the study slice, each check's
verdict on made-up measurements, the stage runner's failure paths, the summary and exit codes,
the offline install's pieces. `make gpu-check-rehearsal` (in CI) runs the stages end to end."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.study.spec import load_study
from harness.tools import gpu_check as gc
from harness.tools import host_site, wheelhouse
from models.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _ctx(tmp_path: Path, **kw) -> gc.Context:
    return gc.Context(work=tmp_path, **kw)


# the study slice


@pytest.mark.parametrize(("base", "rehearse"), [("quick", False), ("tiny", True)])
def test_slice_is_the_dense_model_and_a_matched_moe_of_the_study(tmp_path, base, rehearse):
    ctx = _ctx(tmp_path, base_study=base, rehearse=rehearse, train_seconds=45)
    ctx.facts["matmul"] = {"flops_per_s": 7.9e14}
    path, runs = gc.write_slice(ctx)
    study = load_study(path)  # schema and types: the slice is a study like any other
    source = yaml.safe_load((ROOT / "workflows" / "studies" / f"{base}.yaml").read_text())
    assert [r.run_id.split("_")[0] for r in runs] == [runs[0].model.name, runs[1].model.name]
    dense, moe = runs[0].model, runs[1].model
    assert dense.moe is None and moe.moe is not None and moe.moe.top_k == 2
    assert moe.d_model == dense.d_model and moe.n_layers == dense.n_layers
    assert study.budgets == [1e16] and study.seeds == [0]
    assert study.recipe.compile is (not rehearse) and study.recipe.dtype == source["recipe"].get("dtype", "auto")
    assert study.recipe.batch_size == source["recipe"]["batch_size"]
    assert study.data.max_bytes <= gc.DATA_BYTES and study.data.allow_repetition
    assert study.data.source == source["data"]["source"]


def test_slice_of_a_study_without_a_matched_moe_is_refused():
    base = {"name": "x", "data": {}, "models": [{"config": "dense-m.yaml"}, {"base": "dense-s.yaml", "experts": 8}]}
    with pytest.raises(gc.StageFailed, match=r"no MoE matched to dense-m\.yaml"):
        gc.slice_study(base, "y", 1e16, False)


def test_budget_is_about_the_asked_seconds_at_the_assumed_mfu():
    assert gc.slice_budget(7.9e14, 45) == 1e16  # 1.07e16 to one figure
    assert gc.slice_budget(3.1e14, 45) == 4e15
    assert gc.slice_budget(1e11, 10) == 3e11


def test_widened_model_keeps_head_size_and_ratios():
    dense = yaml.safe_load((ROOT / "models" / "configs" / "dense-m.yaml").read_text())
    wide = gc.widened(dense, 1024)
    assert (wide["d_model"], wide["n_heads"], wide["n_kv_heads"], wide["d_ff"]) == (1024, 16, 8, 4096)
    assert wide["n_layers"] == dense["n_layers"] and wide["name"] == "dense-m-w1024"


def test_widened_model_is_a_valid_config(tmp_path):
    dense = yaml.safe_load((ROOT / "models" / "configs" / "dense-m.yaml").read_text())
    path = tmp_path / "wide.yaml"
    path.write_text(yaml.safe_dump(gc.widened(dense, 1024)))
    assert load_config(path).d_model == 1024


# the verdicts


def _measured(counter=100.0, trace=101.0, tokens_per_s=1000.0, mfu=0.5, flags=()):
    window = {"energy_j": counter, "trace_energy_j": trace, "samples": 100, "power_source": "instant"}
    return {
        "energy_prefill": window,
        "energy_train": window,
        "train": {"tokens_per_s_median": tokens_per_s},
        "mfu": {"conventions": {"detailed": {"fraction_of_measured_matmul": mfu}}},
        "flags": list(flags),
    }


@pytest.mark.parametrize(("trace", "status"), [(104.9, "pass"), (95.1, "pass"), (105.5, "fail"), (90.0, "fail")])
def test_energy_counter_and_trace_agree_within_five_percent(trace, status):
    checks = gc.energy_checks("r", _measured(100.0, trace), rehearse=False)
    assert [c.status for c in checks] == [status, status]
    assert "prefill" in checks[0].name and "train" in checks[1].name


@pytest.mark.parametrize(("counter", "status"), [(250.0, "pass"), (0.0, "fail")])
def test_a_counter_only_window_passes_when_the_counter_counted(counter, status):
    m = _measured(counter, trace=None)
    checks = gc.energy_checks("r", m, rehearse=False)
    assert [c.status for c in checks] == [status, status]
    assert "counter only" in checks[0].value


def test_absent_energy_fails_on_a_gpu_and_is_skipped_in_rehearsal():
    m = _measured()
    m["energy_train"] = {"energy_j": None, "trace_energy_j": None, "absent": {"energy_j": "no GPU"}}
    assert [c.status for c in gc.energy_checks("r", m, rehearse=False)] == ["pass", "fail"]
    skipped = gc.energy_checks("r", m, rehearse=True)[1]
    assert skipped.status == "skip" and "energy_j: no GPU" in skipped.detail


def test_a_flagged_measurement_fails():
    assert gc.plausible("r", _measured()).status == "pass"
    flag = {"figure": "train", "reason": "disturbed"}
    check = gc.plausible("r", _measured(flags=[flag]))
    assert check.status == "fail" and "train: disturbed" in check.detail
    assert gc.plausible("r", _measured(flags=[flag]), rehearse=True).status == "info"


def test_mfu_goal_is_judged_only_at_width_1024():
    assert gc.dense_mfu("r", 512, _measured(mfu=0.1)).status == "info"
    assert gc.dense_mfu("r", 1024, _measured(mfu=0.41)).status == "pass"
    assert gc.dense_mfu("r", 1024, _measured(mfu=0.39)).status == "fail"


@pytest.mark.parametrize(("moe", "status"), [(850.0, "pass"), (840.0, "fail"), (1200.0, "pass")])
def test_moe_over_dense_tokens_per_second_goal(moe, status):
    check = gc.moe_speed(_measured(tokens_per_s=1000.0), _measured(tokens_per_s=moe), rehearse=False)
    assert check.status == status and check.value == f"{moe / 1000:.2f}"
    assert gc.moe_speed(_measured(), _measured(tokens_per_s=1.0), rehearse=True).status == "info"


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{e}" failures="{f}"
skipped="{s}" tests="{t}"><testcase classname="tests.test_moe" name="test_a"/>{cases}</testsuite></testsuites>"""


def _junit(path: Path, tests: int, failures: int = 0, errors: int = 0, skipped: int = 0) -> Path:
    cases = '<testcase classname="tests.test_moe" name="test_bad"><failure message="x"/></testcase>' * failures
    path.write_text(JUNIT.format(t=tests, f=failures, e=errors, s=skipped, cases=cases))
    return path


def test_junit_counts(tmp_path):
    n = gc.junit_counts(_junit(tmp_path / "j.xml", 6, failures=1, errors=1, skipped=1))
    assert (n["passed"], n["failed"], n["errors"], n["skipped"]) == (3, 1, 1, 1)
    assert n["names"] == ["tests.test_moe::test_bad"]


@pytest.mark.parametrize(
    ("counts", "rehearse", "status"),
    [
        ((5, 0, 0, 0), False, "pass"),
        ((5, 1, 0, 0), False, "fail"),
        ((5, 0, 1, 0), False, "fail"),
        ((5, 0, 0, 1), False, "fail"),  # a skipped GPU test on a GPU is a failure
        ((0, 0, 0, 0), False, "fail"),  # nothing ran
        ((5, 0, 0, 5), True, "skip"),  # on the CPU every gpu test skips
        ((5, 1, 0, 4), True, "fail"),
    ],
)
def test_gpu_tests_verdict(tmp_path, monkeypatch, counts, rehearse, status):
    def fake_run(ctx, stage, argv, log):
        assert argv[1:5] == ["-m", "pytest", "-m", "gpu"]
        _junit(tmp_path / "gpu-tests.xml", *counts)
        if counts[1]:
            raise gc.StageFailed("exit 1")

    monkeypatch.setattr(gc, "run", fake_run)
    (check,) = gc.gpu_tests(_ctx(tmp_path, rehearse=rehearse))
    assert check.status == status
    if counts[1]:
        assert "tests.test_moe::test_bad" in check.detail


def test_bench_rows_keep_the_cuda_cases():
    def case(name, **ms):
        return {"extra_info": {"case": name, "median_ms": ms}}

    report = {
        "benchmarks": [
            case("cpu-float32-T4096", moe=1.0, dense=1.0),
            case("cuda-bfloat16-T16384-d1024-E8k2-F2048", moe=2.0, moe_loop=4.0, dense=1.0, mixtral=8.0),
        ]
    }
    (row,) = gc.bench_rows(report)
    assert row["case"].startswith("cuda") and row["vs_dense"] == {"moe": 2.0, "moe_loop": 4.0, "mixtral": 8.0}


# the stage runner


def test_a_stage_that_overruns_is_killed_with_its_children(tmp_path, monkeypatch):
    monkeypatch.setitem(gc.STAGE_SECONDS, "slow", 1)
    pid_file = tmp_path / "child.pid"
    script = (
        "import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
        f"open('{pid_file}', 'w').write(str(p.pid)); time.sleep(60)"
    )
    start = time.perf_counter()
    with pytest.raises(gc.StageFailed, match="timed out after 1 s"):
        gc.run(_ctx(tmp_path), "slow", [sys.executable, "-c", script], tmp_path / "slow.log")
    assert time.perf_counter() - start < 30
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    time.sleep(0.2)
    assert not stat.exists() or stat.read_text().split(")")[1].split()[0] == "Z"  # gone, or dead and unreaped


def test_a_failing_command_names_its_log_and_last_lines(tmp_path):
    script = "import sys; print('first'); print('the reason'); sys.exit(3)"
    with pytest.raises(gc.StageFailed, match=r"exit 3 \(log: .*bad.log\): first \| the reason"):
        gc.run(_ctx(tmp_path), "bad", [sys.executable, "-c", script], tmp_path / "bad.log")


def test_a_failed_stage_is_a_failed_check_and_later_stages_still_run(tmp_path):
    def broken(ctx):
        raise KeyError("matmul")

    def fine(ctx):
        return [gc.Check("fine", "ok", "pass", "1")]

    checks = gc.run_stages(_ctx(tmp_path), (("broken", broken), ("fine", fine)))
    assert [(c.stage, c.status) for c in checks] == [("broken", "fail"), ("fine", "pass")]
    assert "KeyError" in checks[0].detail


def test_wide_mfu_without_the_pipeline_says_why(tmp_path):
    with pytest.raises(gc.StageFailed, match="pipeline stage"):
        gc.wide_mfu(_ctx(tmp_path))


# summary and exit codes


def _stages(*statuses):
    return tuple((f"s{i}", lambda ctx, s=s: [gc.Check("stage", f"check {s}", s, "1")]) for i, s in enumerate(statuses))


@pytest.mark.parametrize(("statuses", "code"), [(("pass", "info", "skip"), 0), (("pass", "fail"), 1)])
def test_main_writes_the_summary_and_exits_on_failures(tmp_path, monkeypatch, capsys, statuses, code):
    monkeypatch.setattr(gc, "STAGES", _stages(*statuses))
    monkeypatch.setattr(gc, "ROOT", tmp_path)
    assert gc.main(["--rehearse", "--out", str(tmp_path / "out")]) == code
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["passed"] is (code == 0) and [c["status"] for c in summary["checks"]] == list(statuses)
    md = (tmp_path / "out" / "summary.md").read_text()
    assert md in capsys.readouterr().out
    assert ("FAILED: 1 of 2 checks" in md) if code else ("All checks passed" in md)
    assert "| stage " in md and "Stage times:" in md


def test_main_without_cuda_refuses_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gc, "ROOT", tmp_path)
    assert gc.main([]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_device_folder_name():
    assert gc.device_folder("NVIDIA H200") == "nvidia-h200"
    assert gc.device_folder("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"


# the offline install on top of the machine's Python


def test_host_site_lets_a_new_venv_use_the_hosts_torch(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", tmp_path / "v"], check=True)
    venv_python = str(tmp_path / "v" / "bin" / "python")
    assert subprocess.run([venv_python, "-c", "import torch"], capture_output=True).returncode != 0
    pth = host_site.link(venv_python, sys.executable)
    out = subprocess.run(
        [venv_python, "-c", "import sys, torch; print(torch.__file__); print(sys.path)"],
        capture_output=True,
        text=True,
        check=True,
    )
    torch_file, path = out.stdout.splitlines()
    assert Path(torch_file).is_relative_to(Path(pth.read_text().split()[0]))
    venv_site = str(pth.parent)
    assert eval(path).index(venv_site) < eval(path).index(pth.read_text().split()[0])  # the venv's own first


def test_host_site_refuses_another_python_version(tmp_path, monkeypatch):
    versions = iter([((3, 12), []), ((3, 11), [])])
    monkeypatch.setattr(host_site, "_probe", lambda python: next(versions))
    with pytest.raises(SystemExit, match=r"is Python 3\.11 but the venv's is 3\.12"):
        host_site.link("venv-python", "host-python")


def _fake_build(sizes):
    def build(dest, target, torch, torch_index, extras, exclude):
        dest.mkdir(parents=True, exist_ok=True)
        build.exclude = exclude
        files = []
        for i, size in enumerate(sizes):
            (dest / f"pkg{i}-1.0-py3-none-any.whl").write_bytes(b"\0" * size)
            files.append(dest / f"pkg{i}-1.0-py3-none-any.whl")
        return files

    return build


def test_wheelhouse_exclude_from_and_size_limit(tmp_path, monkeypatch, capsys):
    build = _fake_build([3 * 2**20, 2 * 2**20])
    monkeypatch.setattr(wheelhouse, "build", build)
    listing = tmp_path / "have.txt"
    listing.write_text("# what the machine has\nnumpy torch  # compiled\n\nscipy\n")
    args = [str(tmp_path / "w"), "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64", "--torch", "none"]
    assert wheelhouse.main([*args, "--exclude-from", str(listing), "--max-mib", "6"]) == 0
    assert build.exclude == ("numpy", "torch", "scipy")
    assert wheelhouse.main([*args, "--max-mib", "4"]) == 1
    assert "5.0 MiB is over --max-mib 4 (largest: pkg0 3.0 MiB" in capsys.readouterr().err


def test_gpu_wheelhouse_leaves_out_what_the_gpu_machine_has():
    listed = (ROOT / "workflows" / "gpu" / "preinstalled.txt").read_text()
    names = {w for line in listed.splitlines() for w in line.split("#")[0].split()}
    assert {"torch", "numpy", "pyarrow", "pandas", "transformers", "pytest", "nvidia-ml-py"} <= names
    assert not {"snakemake", "lm-eval", "datasets", "moe-harness"} & names


def test_make_gpu_check_installs_offline_on_top_of_the_machines_python(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "SHA256SUMS").write_text("")
    make = ["make", "-n", "--no-print-directory", "gpu-check", f"VENV={tmp_path}/venv", f"GPU_WHEELS={wheels}"]
    out = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert f"harness.tools.host_site {tmp_path}/venv/bin/python python3" in out
    assert f"--no-index --find-links {wheels}" in out and "-e '.'" in out
    assert out.rstrip().endswith("-m harness.tools.gpu_check")
    without = subprocess.run([*make[:-1], f"GPU_WHEELS={tmp_path}/none"], cwd=ROOT, capture_output=True, text=True)
    assert "--no-index" not in without.stdout


def test_measure_of_a_run_refuses_precision_flags(capsys):
    """--dtype and --compile describe a bare config (the wide-MFU stage); a run is measured as it trained."""
    from harness.cli import main

    assert main(["measure", "tiny", "--run", "dense-d64_7e12_s0", "--compile"]) == 2
    err = capsys.readouterr().err
    assert "--dtype/--compile" in err and "as it trained" in err and "Traceback" not in err


def test_a_stage_gets_only_what_is_left_of_the_whole_check(tmp_path):
    ctx = _ctx(tmp_path, deadline=time.monotonic() + 0.5)
    with pytest.raises(gc.StageFailed, match="not run: the 420 s of all stages are spent"):
        gc.run(ctx, "pipeline", [sys.executable, "-c", "pass"], tmp_path / "late.log")
