"""Names and paths a user chooses: a study folder or virtual environment whose path holds a space,
model and study names, and `--config study=` left empty.

Every shell command of the workflow quotes the paths it is given; a model or study name is one
pattern (models.config.NAME_PATTERN), refused with one line naming the field otherwise.
"""

from __future__ import annotations

import ast
import os
import string
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from pico_study import MODEL_FILE, STUDY, cli

from harness.workflow.snakefile import choose_study
from models.config import NAME_PATTERN, ConfigError

RULES = sorted((ROOT / "workflows" / "rules").glob("*.smk"))
UNQUOTED = {"threads", "LAUNCH", "RESTART_FLAG", "REUSE_FLAG", "params.download"}
"""Placeholders that are no path: numbers, flags, and LAUNCH, a command line that quotes its own."""


def _shell_commands(path: Path) -> list[str]:
    """Each `shell:` command of a rules file, its string literals joined."""
    commands, lines = [], path.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip() != "shell:":
            continue
        parts = []
        for follow in lines[i + 1 :]:
            if not follow.strip().startswith(('"', "'")):
                break
            parts.append(ast.literal_eval(follow.strip()))
        commands.append("".join(parts))
    return commands


def test_every_shell_command_quotes_its_paths():
    commands = [(p.name, c) for p in RULES for c in _shell_commands(p)]
    assert len(commands) >= 8, "every rule's shell command is found"
    for name, command in commands:
        for _, field, spec, _ in string.Formatter().parse(command):
            if field is None or field in UNQUOTED or field.startswith("resources."):
                continue
            assert (spec or "").endswith("q"), f"{name}: {{{field}}} is not quoted ({{{field}:q}}) in: {command}"


def test_launch_quotes_the_python_it_runs():
    text = (ROOT / "workflows" / "rules" / "common.smk").read_text()
    launch = text[text.index("LAUNCH = (") : text.index("# Threads of a training job")]
    assert "{PY}" not in launch and launch.count("{shlex.quote(PY)}") == 2


# --- names -------------------------------------------------------------------------------------


def set_yaml(name: str, dotted: str, value) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        data = yaml.safe_load((root / name).read_text())
        node = data
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[last] = value
        (root / name).write_text(yaml.safe_dump(data))

    return change


@dataclass(frozen=True)
class Case:
    id: str
    change: Callable[[Path], None]
    names: tuple[str, ...]
    code: int = 2


CASES = [
    Case("model-name-brackets", set_yaml(MODEL_FILE, "name", "pico(v2)"), ("field 'name'", "'pico(v2)'")),
    Case("model-name-space", set_yaml(MODEL_FILE, "name", "pico v2"), ("field 'name'", "'pico v2'")),
    Case("model-name-leading-dash", set_yaml(MODEL_FILE, "name", "-pico"), ("field 'name'", "'-pico'")),
    Case("model-name-quote", set_yaml(MODEL_FILE, "name", "pico'2"), ("field 'name'",)),
    Case("study-model-name", set_yaml(STUDY, "models.0.name", "pico(v2)"), ("field 'models.0.name'", "'pico(v2)'")),
    Case("study-name-space", set_yaml(STUDY, "name", "my study"), ("field 'name'", "'my study'")),
    Case("study-name-slash", set_yaml(STUDY, "name", "a/b"), ("field 'name'", "'a/b'")),
    Case("model-name-allowed", set_yaml(MODEL_FILE, "name", "pico.v2_b-1"), (), 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_name_is_one_pattern(case: Case, study: Path, monkeypatch):
    monkeypatch.chdir(study)
    case.change(study)
    code, err = cli("plan", STUDY, "--results", "results")
    assert code == case.code, err
    if case.code:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "letters, digits, '_', '.' and '-'" in lines[0], err
        for name in case.names:
            assert name in lines[0], (name, err)


def test_the_schema_and_the_code_share_the_name_pattern():
    schema = yaml.safe_load((ROOT / "workflows" / "schemas" / "study.schema.yaml").read_text())
    assert schema["properties"]["name"]["pattern"] == NAME_PATTERN
    assert schema["properties"]["models"]["items"]["properties"]["name"]["pattern"] == NAME_PATTERN


# --- --config study= -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  "])
def test_an_empty_study_choice_is_refused(value):
    with pytest.raises(ConfigError, match=r"--config: field 'study': is empty"):
        choose_study(value, given=True)
    assert choose_study("quick") == ("quick", "chosen with --config study=...")


@pytest.mark.slow
def test_snakemake_refuses_an_empty_study_rather_than_running_tiny():
    done = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--config", "study="],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "field 'study': is empty" in said, said
    assert "study 'tiny'" not in said


# --- paths with spaces, for real ------------------------------------------------------------------


@pytest.mark.slow
def test_the_data_step_runs_from_paths_with_spaces(pristine: Path, tmp_path: Path):
    """The pico study in a folder whose path holds a space, its study file named with one, run by
    a Python whose path holds one: Snakemake runs the data rule and it succeeds."""
    from pico_study import copy_study

    root = copy_study(pristine, tmp_path / "my studies" / "pico (copy)")
    (root / "study files").mkdir()
    study_file = (root / STUDY).rename(root / "study files" / "pico's study.yaml")
    data = root / "results" / "pico" / "data"
    for name in ("data.json", "tokenizer.json"):
        (data / name).unlink()
    venv = tmp_path / "my env"
    venv.symlink_to(Path(sys.prefix), target_is_directory=True)
    python = venv / "bin" / Path(sys.executable).name
    env = os.environ | {"PYTHONPATH": str(ROOT)}  # the job runs this checkout's harness
    cmd = [str(python), "-m", "snakemake", "results/pico/data/data.json", "-s", str(ROOT / "Snakefile")]
    cmd += ["--directory", str(root), "--cores", "1", "--config", f"study={study_file}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=root)
    said = done.stdout + done.stderr
    assert done.returncode == 0, said
    shell = next(line for line in said.splitlines() if "-m harness data" in line)
    assert "my env/bin/" in shell and "pico'\"'\"'s study.yaml" in shell, shell
    assert (data / "data.json").is_file() and (root / "results" / "pico" / "logs" / "data.log").is_file()
