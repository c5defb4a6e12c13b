"""The files a study's ``data.paths`` name, each with its key, in a deterministic order.

A key is the file's path relative to its pattern's base (``corpus/mod_001.py`` for
``/data/corpus``): it decides the file's split and enters the data fingerprint, so it does not
depend on where the corpus lies.

Symbolic links (a file, a folder or a glob of ``data.paths``, and everything found in a folder)
are read as what they point to, under their own path: the keys, the splits and the fingerprint
are those of a copy of the target put where the link is. A link to a folder is walked as a
folder (one folder reached through two links is read twice, under both keys). A link whose
target does not exist, and a link that leads back into a folder it lies in (a loop), are
refused, naming the link. The data folder the step writes may itself be a link to a folder (it
is written in its target); a link there that leads nowhere, and a link where the step writes a
file, are refused.
"""

from __future__ import annotations

import errno
import glob
import os
import site
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from harness.core.errors import HarnessError
from models.config import ConfigError


def _glob_base(pattern: str) -> Path:
    """The folder a pattern's keys are relative to: its leading components without wildcards, less
    the last one (so that a folder's name stays in its files' keys)."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return Path(*parts[: max(fixed - 1, 0) if fixed == len(parts) else fixed]) if parts else Path()


def _link_refusal(link: Path, field: str, source: str) -> ConfigError | None:
    """The refusal of a corpus link that leads nowhere (its target does not exist, or it loops);
    None when it leads to something."""
    try:
        link.stat()
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            raise
        why = "loops (it leads back to itself)" if e.errno == errno.ELOOP else "does not exist"
        return ConfigError(
            field,
            f"{link} is a symbolic link to {os.readlink(link)}, which {why}: restore its target or remove the link",
            source,
        )
    return None


def _loop(path: Path, real: str, field: str, source: str) -> ConfigError:
    return ConfigError(
        field, f"{path} leads back to {real}, a folder it lies in (a symbolic link loop): remove the link", source
    )


def _walk(folder: Path, above: frozenset[str], field: str, source: str) -> Iterator[Path]:
    """The files under ``folder`` in sorted order, links followed: a link to a file is a file, a
    link to a folder is walked as a folder. ``above``: the real paths of ``folder`` and the folders
    it lies in, so that a link leading back into one is refused rather than walked round."""
    with os.scandir(folder) as scan:
        entries = sorted(scan, key=lambda e: e.name)
    for entry in entries:
        path = folder / entry.name
        if entry.is_symlink() and (refusal := _link_refusal(path, field, source)):
            raise refusal
        if entry.is_dir():
            real = os.path.realpath(path)
            if real in above:
                raise _loop(path, real, field, source)
            yield from _walk(path, above | {real}, field, source)
        elif entry.is_file():
            yield path


def _folders_along(path: Path, base: Path, field: str, source: str, real: dict[Path, str]) -> frozenset[str]:
    """The real paths of the folders from ``base`` down to ``path`` (``path`` too, if a folder);
    refused when two are one folder: a link on the way (a glob's ``**`` follows links) leads back
    into a folder above it. ``real``: the real paths found so far."""
    seen: set[str] = set()
    for k in range(len(base.parts), len(path.parts) + 1):
        folder = Path(*path.parts[:k])
        if folder == path and not path.is_dir():
            break
        if folder not in real:
            real[folder] = os.path.realpath(folder)
        if real[folder] in seen:
            raise _loop(folder, real[folder], field, source)
        seen.add(real[folder])
    return frozenset(seen)


def _not_found(path: Path, pattern: str, field: str, source: str) -> ConfigError:
    """Why ``path`` (``pattern``, or what it names) is neither a file nor a folder."""
    for above in reversed(path.parents):
        if above.is_symlink() and (refusal := _link_refusal(above, field, source)):
            return refusal
    if os.path.exists(path):
        return ConfigError(field, f"{path} is neither a file nor a folder", source)
    return ConfigError(field, f"no such file or folder: {pattern}", source)


def expand_paths(paths: list[str], source: str) -> list[tuple[str, Path]]:
    """(key, file) for every file the patterns name. A key is the file's path relative to its
    pattern's base (``corpus/mod_001.py`` for ``/data/corpus``): it decides the file's split and
    enters the data fingerprint, so it must not depend on where the corpus lies. A symbolic link
    is a file or folder where it lies (its target's content under its own key); one that leads
    nowhere, or round a loop, is refused."""
    out: list[tuple[str, Path]] = []
    for i, pattern in enumerate(paths):
        field, base, real = f"data.paths[{i}]", _glob_base(pattern), {}
        matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True)) or [Path(pattern)]
        for m in matches:
            if m.is_symlink() and (refusal := _link_refusal(m, field, source)):
                raise refusal
            above = _folders_along(m, base, field, source, real)
            if m.is_dir():
                out.extend((p.relative_to(base).as_posix(), p) for p in _walk(m, above, field, source))
            elif m.is_file():
                out.append((m.relative_to(base).as_posix(), m))
            else:
                raise _not_found(m, pattern, field, source)
    return out


def python_files(root: Path, prefix: str, skip_packages: bool) -> Iterator[tuple[str, Path]]:
    """``.py`` files under root in sorted order; for the standard library, without any
    site-packages folder it contains (installed packages are the python-site source)."""
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip_packages and any(part in ("site-packages", "dist-packages") for part in rel.parts):
            continue
        yield f"{prefix}/{rel.as_posix()}", path


def site_dirs() -> list[Path]:
    dirs = {Path(p) for p in [*site.getsitepackages(), sysconfig.get_paths()["purelib"]] if Path(p).is_dir()}
    return sorted(dirs)


def check_data_folder(out_dir: Path) -> None:
    """Refuse a data folder, or a folder above it, that is a symbolic link leading nowhere: the data
    is written in a linked folder's target, which must exist."""
    for folder in reversed([out_dir, *out_dir.parents]):
        if not folder.is_symlink():
            continue
        try:
            folder.stat()
        except OSError as e:
            link = f"{folder} is a symbolic link to {os.readlink(folder)}"
            if e.errno == errno.ELOOP:
                raise HarnessError(f"{link}, which loops: make it lead to a folder, or remove the link") from None
            raise HarnessError(
                f"{link}, which does not exist: the data is written in a linked folder's target, so create "
                f"{os.path.realpath(folder)}, or remove the link"
            ) from None


def check_no_links(out_dir: Path, writes: tuple[str, ...]) -> None:
    """Refuse, before anything is written, a file the data step writes (``writes``) that is a
    symbolic link: it would replace the link, not write its target."""
    links = [
        f"{name} (a symbolic link to {os.readlink(out_dir / name)})" for name in writes if (out_dir / name).is_symlink()
    ]
    if links:
        raise HarnessError(
            f"{out_dir} holds symbolic links where harness data writes its files: {', '.join(links)}; it replaces no "
            "link: remove them (their targets stay as they are), or link the whole data folder instead"
        )
