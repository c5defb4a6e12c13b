"""Symbolic links met by ``harness export`` and ``harness data``, each verb run as a user runs it.

A link is either refused, in one line naming it and what to do (exit 2, nothing changed, its
target untouched), or treated as harness/evaluate/export.py and harness/data/prepare.py document:
an export is written in the target of a linked folder above ``--out``, data in the target of a
linked data folder, and a corpus link is read as a copy of its target put where the link is.
Each refusal that names a remedy is followed by that remedy once, to show it works.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config
from pico_study import RUN, STUDY, cli, make_pristine
from verb_subprocess import assert_one_line, assert_unchanged, run_verb, snapshot

from harness.core.errors import HarnessError
from harness.data.corpus import _signature
from harness.data.prepare import corpus_fingerprint, iter_documents
from harness.evaluate.export import export
from harness.study.spec import DataConfig, DataSource
from models.transformer import Transformer

pytestmark = pytest.mark.slow  # each case runs a verb as a subprocess on a trained study

R = ["--results", "results"]
EXPORT = ["harness", "export", STUDY, "--run", RUN, *R]
DATA = ["harness", "data", STUDY, *R]
EXPORTED = f"results/pico/export/{RUN}"
SHELF = "shelf"
"""A folder of the study where the links' targets lie, so that snapshots see them."""


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """The prepared pico study (conftest's ``pristine``) with an earlier export of its run."""
    root = make_pristine(tmp_path_factory.mktemp("pristine"))
    code, err = cli("export", str(root / STUDY), "--results", str(root / "results"), "--run", RUN)
    assert code == 0, err
    return root


# --- changes a case makes before its command --------------------------------------------------


def link(rel: str, target: str) -> Callable[[Path], None]:
    """``rel`` made a symbolic link to ``target`` (as written: relative to the link's folder)."""

    def change(root: Path) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, root / rel)

    return change


def shelved(rel: str, target: str) -> Callable[[Path], None]:
    """``rel`` moved to ``shelf/<name>`` and replaced by a link to it, written as ``target``."""

    def change(root: Path) -> None:
        (root / SHELF).mkdir(exist_ok=True)
        shutil.move(root / rel, root / SHELF / Path(rel).name)
        os.symlink(target, root / rel)

    return change


def folder(rel: str) -> Callable[[Path], None]:
    return lambda root: (root / rel).mkdir(parents=True)


def corpus_paths(*patterns: str) -> Callable[[Path], None]:
    """``data.paths`` set to ``patterns``, relative to the study folder (absolute in the study)."""

    def change(root: Path) -> None:
        study = yaml.safe_load((root / STUDY).read_text())
        study["data"]["paths"] = [str(root / p) for p in patterns]
        (root / STUDY).write_text(yaml.safe_dump(study))

    return change


def data_folder_to_nothing(root: Path) -> None:
    """The prepared data moved aside, and its folder a link to one that does not exist."""
    shutil.move(root / "results/pico/data", root / "moved-data")
    os.symlink("../../shelf/data", root / "results/pico/data")


def steps(*changes: Callable[[Path], None]) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        for c in changes:
            c(root)

    return change


@dataclass
class Case:
    id: str
    change: Callable[[Path], None]
    argv: list[str]
    names: list[str]  # each in the one error line; {root} is the study folder


CASES = [
    # export: a link inside an earlier export is the user's (an export writes none)
    Case(
        "earlier-export-holds-a-link-to-a-folder",
        link(f"{EXPORTED}/extra", "../../../../corpus"),
        EXPORT,
        [EXPORTED, "extra (a symbolic link to ../../../../corpus)", "no earlier export wrote", "move them out"],
    ),
    Case(
        "earlier-export-file-is-a-link",
        steps(
            shelved(f"{EXPORTED}/model.safetensors", "../../../../shelf/model.safetensors"),
            link(f"{EXPORTED}/notes.md", "gone.md"),
        ),
        EXPORT,
        ["model.safetensors (a symbolic link to ../../../../shelf/model.safetensors)", "notes.md (a symbolic link"],
    ),
    # export: --out that is a link, or lies below one that leads nowhere
    Case(
        "out-is-a-link-to-a-folder",
        steps(folder("shelf/hf"), link("hf", "shelf/hf")),
        [*EXPORT, "--out", "hf"],
        ["hf is a symbolic link to shelf/hf", "replaces no link", "give --out {root}/shelf/hf"],
    ),
    Case(
        "out-is-a-link-to-a-file",
        link("weights", "model.yaml"),
        [*EXPORT, "--out", "weights"],
        ["weights is a symbolic link to model.yaml, a file", "give --out a folder"],
    ),
    Case(
        "out-is-a-link-to-nothing",
        link("hf", "shelf/gone"),
        [*EXPORT, "--out", "hf"],
        ["hf is a symbolic link to shelf/gone, which does not exist", "give --out {root}/shelf/gone"],
    ),
    Case(
        "out-below-a-link-to-nothing",
        link("exports", "shelf/gone"),
        [*EXPORT, "--out", "exports/hf"],
        ["exports is a symbolic link to shelf/gone, which does not exist", "--out another path"],
    ),
    # data: a corpus link that leads nowhere, in a folder, matched by a glob, or round a loop
    Case(
        "corpus-folder-holds-a-link-to-nothing",
        link("corpus/zz.py", "gone.py"),
        DATA,
        ["data.paths[0]", "{root}/corpus/zz.py is a symbolic link to gone.py, which does not exist", "remove the link"],
    ),
    Case(
        "corpus-glob-matches-a-link-to-nothing",
        steps(corpus_paths("corpus/*.py"), link("corpus/m00b.py", "../shelf/gone.py")),
        DATA,
        ["{root}/corpus/m00b.py is a symbolic link to ../shelf/gone.py, which does not exist"],
    ),
    Case(
        "corpus-link-loops",
        link("corpus/again", "."),
        DATA,
        ["{root}/corpus/again leads back to {root}/corpus", "loop", "remove the link"],
    ),
    # data: its folder a link that leads nowhere; a file it writes a link
    Case(
        "data-folder-is-a-link-to-nothing",
        data_folder_to_nothing,
        DATA,
        ["results/pico/data is a symbolic link to ../../shelf/data, which does not exist", "create {root}/shelf/data"],
    ),
    Case(
        "shard-is-a-link",
        shelved("results/pico/data/train.bin", "../../../shelf/train.bin"),
        [*DATA, "--force"],
        ["train.bin (a symbolic link to ../../../shelf/train.bin)", "replaces no link", "remove them"],
    ),
]


def refused(case: Case, root: Path) -> str:
    """Run ``case`` on the study at ``root``: refused as the case says, nothing changed; the line."""
    case.change(root)
    before = snapshot(root)
    done = run_verb(case.argv, root)
    line = assert_one_line(done, f"harness {case.argv[1]}: error: ", [n.format(root=root) for n in case.names])
    assert done.stdout == "", done.stdout
    assert_unchanged(before, snapshot(root))
    return line


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_link_is_refused_in_one_line_and_nothing_changes(case: Case, study: Path):
    refused(case, study)


def test_export_into_the_target_the_refusal_names_and_below_a_linked_folder(study: Path):
    (case,) = [c for c in CASES if c.id == "out-is-a-link-to-a-folder"]
    line = refused(case, study)
    out = re.search(r"give --out (\S+)", line).group(1)
    done = run_verb([*EXPORT, "--out", out], study)
    assert done.returncode == 0, done.stderr
    assert os.readlink(study / "hf") == "shelf/hf", "the link is left as it is"
    assert json.loads((study / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # A linked folder above --out is followed: the export lands in its target, the link stays.
    os.symlink(SHELF, study / "exports")
    before = snapshot(study)
    done = run_verb([*EXPORT, "--out", "exports/again"], study)
    assert done.returncode == 0, done.stderr
    assert os.readlink(study / "exports") == SHELF
    assert_unchanged(before, snapshot(study), may_write={"shelf/again", "shelf/again/"})
    assert (study / SHELF / "again" / "model.safetensors").is_file()


def test_data_is_written_in_the_linked_folder_the_refusal_names(study: Path):
    (case,) = [c for c in CASES if c.id == "data-folder-is-a-link-to-nothing"]
    line = refused(case, study)
    target = Path(re.search(r"create (\S+), or", line).group(1))
    target.mkdir(parents=True)
    before = snapshot(study)
    done = run_verb(DATA, study)
    assert done.returncode == 0, done.stderr
    assert os.readlink(study / "results/pico/data") == "../../shelf/data", "the link is left as it is"
    assert_unchanged(before, snapshot(study), may_write={"shelf/data/"})
    made, earlier = (json.loads((d / "data.json").read_text()) for d in (target, study / "moved-data"))
    assert made["fingerprint"] == earlier["fingerprint"]
    assert made["splits"] == earlier["splits"], "the same tokens, written through the link"


def test_data_prepared_again_once_the_named_link_is_removed(study: Path):
    (case,) = [c for c in CASES if c.id == "shard-is-a-link"]
    refused(case, study)
    kept = (study / SHELF / "train.bin").read_bytes()
    (study / "results/pico/data/train.bin").unlink()  # the remedy: its target stays as it is
    done = run_verb(case.argv, study)
    assert done.returncode == 0, done.stderr
    assert (study / "results/pico/data/train.bin").read_bytes() == kept, "the same tokens, in a file of its own"
    assert (study / SHELF / "train.bin").read_bytes() == kept


def test_corpus_links_read_as_copies_of_their_targets(tmp_path: Path):
    """A link to a file and a link to a folder give the keys, texts and fingerprint of a copy of
    their targets put there; a link turned to another file of the same size and time is seen."""
    (tmp_path / "elsewhere" / "lib").mkdir(parents=True)
    for name, text in {"a.py": "x = 1\n", "b.py": "y = 2\n", "lib/c.py": "z = 3\n"}.items():
        (tmp_path / "elsewhere" / name).write_text(text)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "own.py").write_text("own = 0\n")
    os.symlink(tmp_path / "elsewhere" / "a.py", linked / "a.py")
    os.symlink("../elsewhere/lib", linked / "lib")
    copied = tmp_path / "copied" / "linked"
    shutil.copytree(linked, copied, symlinks=False)
    assert not any(p.is_symlink() for p in copied.rglob("*"))

    def config(root: Path) -> DataConfig:
        return DataConfig(source=DataSource.FILES, paths=[str(root)])

    def documents(root: Path) -> list[tuple[str, str]]:
        return [(d.key, d.text) for d in iter_documents(config(root), "s.yaml")]

    assert (
        documents(linked)
        == documents(copied)
        == [
            ("linked/a.py", "x = 1\n"),
            ("linked/lib/c.py", "z = 3\n"),
            ("linked/own.py", "own = 0\n"),
        ]
    )
    assert corpus_fingerprint(config(linked), "s.yaml") == corpus_fingerprint(config(copied), "s.yaml")

    study = types.SimpleNamespace(data=config(linked), path="s.yaml")
    signature = _signature(study)
    b = tmp_path / "elsewhere" / "b.py"
    os.utime(b, ns=((linked / "a.py").stat().st_atime_ns, (linked / "a.py").stat().st_mtime_ns))
    (linked / "a.py").unlink()
    os.symlink(b, linked / "a.py")  # same size, same time, another file
    assert _signature(study) != signature


def readme_fails(mp: pytest.MonkeyPatch) -> None:
    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr("harness.evaluate.export.readme", full)  # after the weights are written


def rename_fails(which: Callable[[Path], bool]) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(mp: pytest.MonkeyPatch) -> None:
        rename = Path.rename

        def refuse(self: Path, target):
            if which(self):
                raise OSError(errno.EACCES, "Permission denied", str(self))
            return rename(self, target)

        mp.setattr(Path, "rename", refuse)

    return patch


SWAP_FAILURES = {
    # (an earlier export at, --out, the failure)
    "writing-into-folders-made-for-it": (None, "new/deeper/hf", readme_fails),
    "setting-the-earlier-export-aside": ("hf", "hf", rename_fails(lambda p: p.name == "hf")),
    "moving-the-new-export-into-place": ("hf", "hf", rename_fails(lambda p: p.name.endswith(".tmp"))),
}


@pytest.mark.parametrize("failure", SWAP_FAILURES)
def test_a_failed_export_leaves_the_earlier_one_and_nothing_else(failure: str, tmp_path: Path, monkeypatch):
    """Wherever the write or the swap fails, the earlier export stays as it was, and neither the
    temporary folder, nor the earlier export set aside, nor a folder made for the export is left."""
    earlier, out, patch = SWAP_FAILURES[failure]
    cfg = tiny_config()
    state = Transformer(cfg).state_dict()
    if earlier is not None:
        export(cfg, state, None, tmp_path / earlier)
    before = snapshot(tmp_path)
    patch(monkeypatch)
    with pytest.raises(HarnessError):
        export(cfg, state, None, tmp_path / out)
    assert_unchanged(before, snapshot(tmp_path))
