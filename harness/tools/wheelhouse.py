"""Every dependency as wheels in one folder, for an install on a node with no network.

    make wheelhouse WHEELS=DIR [PYTHON_VERSION=3.12] [PLATFORM=manylinux_2_28_x86_64]
                    [TORCH_BUILD=none|default|cpu|cu126] [WHEELHOUSE_EXCLUDE="transformers ..."]
    make install WHEELS=DIR          # on the node: pip install --no-index --find-links DIR

or ``python -m harness.tools.wheelhouse DIR --help``. It runs with the Python that makes the venv, before
any venv exists, so it needs only the standard library, pip (22.2 or newer) and its packaging.

1. Build the project's wheel, and wheels of the dependencies that PyPI has only as source
   (``SOURCE_ONLY``, all pure Python, so a wheel built here installs on any platform).
2. Resolve the whole set for the target Python and platform, wheels only, with pip's
   ``install --dry-run --report`` (which reads metadata and downloads no wheel where the index
   serves metadata).
3. Keep what the roots need without passing through an excluded package: leaving out torch
   (TORCH_BUILD=none) leaves out the CUDA libraries and triton that only torch needs. The build
   tools (hatchling, editables) keep all they need: pip installs them into an isolated build
   environment, which sees none of the node's own packages.
   Markers are evaluated for the target: pip evaluates them for the Python that runs it, so a
   requirement only the target's Python has is resolved in one more round.
4. Download those files, hashes checked, and delete the folder's other wheels.
5. Write ``requirements.txt`` (what the folder holds, pinned) and ``SHA256SUMS`` (which
   ``sha256sum -c`` checks, as ``make install WHEELS=DIR`` does before installing).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform as host
import re
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
except ImportError:  # a bare system Python: pip's own copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
SOURCE_ONLY = ("connection-pool", "rouge-score", "sqlitedict", "word2number")
"""Dependencies (of snakemake and lm-eval) published only as source. A new one makes step 2 fail
with "No matching distribution found for NAME": add it here if it is pure Python."""
EDITABLE_REQUIRES = ("editables",)
"""What hatchling asks for besides itself to install the project editable (``pip install -e``)."""
LEGACY_MANYLINUX = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
"""PEP 600's older names for manylinux_2_17, _2_12 and _2_5."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Target:
    """The Python and platform the wheels are for."""

    python_version: str
    """major.minor, e.g. 3.12."""
    platform: str
    """A Linux platform tag, e.g. manylinux_2_28_x86_64 (glibc 2.28 or newer, x86_64)."""

    def __post_init__(self):
        if not re.fullmatch(r"3\.\d+", self.python_version):
            raise ValueError(f"PYTHON_VERSION={self.python_version}: give major.minor, e.g. 3.12")
        if not re.fullmatch(r"(many|musl)?linux(_\d+_\d+|\d+)?_\w+", self.platform):
            raise ValueError(f"PLATFORM={self.platform}: give a Linux platform tag, e.g. manylinux_2_28_x86_64")

    @classmethod
    def host(cls) -> Target:
        libc, version = host.libc_ver()
        if libc != "glibc":
            raise ValueError("this host's C library is not glibc: give PLATFORM, e.g. manylinux_2_28_x86_64")
        major, minor = version.split(".")[:2]
        return cls(f"{sys.version_info[0]}.{sys.version_info[1]}", f"manylinux_{major}_{minor}_{host.machine()}")

    def pip_args(self) -> list[str]:
        out = ["--only-binary=:all:", "--implementation", "cp", "--python-version", self.python_version]
        for tag in platforms(self.platform):
            out += ["--platform", tag]
        return out

    def markers(self) -> dict[str, str]:
        """The environment markers of the target (PEP 508), for its requirements' conditions."""
        same = self.python_version == f"{sys.version_info[0]}.{sys.version_info[1]}"
        full = host.python_version() if same else f"{self.python_version}.0"
        machine = re.fullmatch(r"(?:many|musl)?linux(?:_\d+_\d+|\d+)?_(\w+)", self.platform)[1]
        return default_environment() | {
            "python_version": self.python_version,
            "python_full_version": full,
            "implementation_name": "cpython",
            "implementation_version": full,
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "os_name": "posix",
            "platform_machine": machine,
        }


def platforms(tag: str) -> list[str]:
    """The tag and every older manylinux tag. pip takes --platform literally, so that
    manylinux_2_28_x86_64 alone finds no manylinux_2_17 wheel, though such a wheel installs there."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tag)
    if not m:
        return [tag]
    newest, arch = int(m[1]), m[2]
    out = [f"manylinux_2_{minor}_{arch}" for minor in range(newest, 4, -1)]  # glibc 2.5: the oldest
    return out + [f"{name}_{arch}" for minor, name in LEGACY_MANYLINUX.items() if minor <= newest]


def pip(*args: str | Path) -> None:
    """pip of the Python that runs this; -qq: errors only (a mirror's warnings are not ours)."""
    subprocess.run([sys.executable, "-m", "pip", "-qq", *map(str, args)], check=True)


def build_local(dest: Path) -> Path:
    """The project's wheel (replacing an older one) and the source-only dependencies' wheels."""
    for old in dest.glob("moe_harness-*.whl"):
        old.unlink()
    pip("wheel", "--no-deps", "--wheel-dir", dest, ROOT)
    pip("wheel", "--no-deps", "--wheel-dir", dest, "--find-links", dest, *SOURCE_ONLY)
    return next(dest.glob("moe_harness-*.whl"))


def resolve(roots: list[str], target: Target, dest: Path, torch_index: str | None) -> dict:
    """pip's installation report: every package the roots need on the target, with its metadata
    and the file it would install. Reads metadata; downloads no wheel where the index serves it."""
    index = ["--extra-index-url", torch_index] if torch_index else []
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        where = ["--report", report, "--target", Path(tmp) / "unused", "--find-links", dest]
        pip("install", "--dry-run", *where, *target.pip_args(), *index, *roots)
        return json.loads(report.read_text())


def needed(report: dict, roots: list[str], exclude: set[str], env: dict[str, str]) -> tuple[dict, list[str]]:
    """The report's packages (name -> item) that the roots need on the target without passing
    through an excluded package, and the requirements the target needs that the report lacks."""
    items = {canonical(item["metadata"]["name"]): item for item in report["install"]}
    kept: dict[str, dict] = {}
    extras: dict[str, set[str]] = {}
    missing: list[str] = []
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in exclude or (name in kept and set(req.extras) <= extras[name]):
            continue
        if name not in items:
            missing.append(f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}")
            continue
        kept[name] = items[name]
        extras.setdefault(name, set()).update(req.extras)
        for dep in map(Requirement, items[name]["metadata"].get("requires_dist", [])):
            wanted = [env | {"extra": e} for e in extras[name] | {""}]
            if dep.marker is None or any(dep.marker.evaluate(w) for w in wanted):
                todo.append(dep)
    return kept, sorted(set(missing))


def keep(report: dict, roots: list[str], tools: list[str], exclude: set[str], env: dict[str, str]) -> tuple[dict, list]:
    """``needed`` for the roots, plus everything the build tools need, excluded or not: pip
    installs those into an isolated build environment, which sees none of the node's packages."""
    kept, missing = needed(report, roots, exclude, env)
    for_tools, missing_for_tools = needed(report, tools, set(), env)
    return kept | for_tools, sorted(set(missing) | set(missing_for_tools))


def _file(item: dict) -> Path:
    """Where pip found an item of the report (a file:// or https:// address), as a path."""
    return Path(unquote(urlparse(item["download_info"]["url"]).path))


def fetch(items: list[dict], target: Target, dest: Path) -> list[Path]:
    """The items' files in ``dest``, downloaded from where pip resolved them, hashes checked."""
    urls = []
    for item in [i for i in items if _file(i).parent.resolve() != dest.resolve()]:  # not built in step 1
        info = item["download_info"]
        sha = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        urls.append(f"{item['metadata']['name']} @ {info['url']}" + (f"#sha256={sha}" if sha else ""))
    if urls:
        pip("download", "--no-deps", "--dest", dest, *target.pip_args(), *urls)
    return [dest / _file(item).name for item in items]


def _listed(dest: Path) -> set[str]:
    """The wheels an earlier build listed in SHA256SUMS."""
    sums = dest / "SHA256SUMS"
    return {line.split()[-1] for line in sums.read_text().splitlines() if line.strip()} if sums.is_file() else set()


def write_manifest(dest: Path, files: list[Path], items: list[dict]) -> None:
    pins = sorted(f"{item['metadata']['name']}=={item['metadata']['version']}" for item in items)
    (dest / "requirements.txt").write_text("\n".join(pins) + "\n")
    sums = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}" for f in sorted(files)]
    (dest / "SHA256SUMS").write_text("\n".join(sums) + "\n")


def build(
    dest: Path,
    target: Target,
    torch: str | None,
    torch_index: str | None = None,
    extras: str = "dev,tensorboard",
    exclude: tuple[str, ...] = (),
) -> list[Path]:
    """Fill ``dest`` (steps 1-5); ``torch`` is a requirement such as torch==2.13.0, or None to
    leave torch out. Returns the wheels."""
    dest.mkdir(parents=True, exist_ok=True)
    own = build_local(dest)
    build_requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    tools = [*build_requires, *EDITABLE_REQUIRES]
    project = f"moe-harness[{extras}]" if extras else "moe-harness"
    roots = ["pip", *tools, f"{project} @ {own.resolve().as_uri()}"]
    roots += [torch] if torch else []
    skip = {canonical(n) for n in exclude} | (set() if torch else {"torch"})
    extra: list[str] = []
    for _ in range(3):  # the rounds of step 3
        report = resolve(roots + extra, target, dest, torch_index)
        kept, missing = keep(report, roots, tools, skip, target.markers())
        if not missing:
            break
        extra += missing
    else:
        raise SystemExit(f"wheelhouse: the target needs {', '.join(missing)}, which pip does not resolve")
    items = list(kept.values())
    earlier = _listed(dest)  # what the last build wrote: only those of its wheels may go
    files = fetch(items, target, dest)
    for stale in set(dest.glob("*.whl")) - set(files):
        if stale.name in earlier:
            stale.unlink()
        else:
            print(f"wheelhouse: {stale} was not written by a build here; left as it is", file=sys.stderr)
    write_manifest(dest, files, items)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.tools.wheelhouse", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, metavar="DIR", help="the folder to fill (made if absent)")
    parser.add_argument("--python-version", help="major.minor of the target Python (default: this one's)")
    parser.add_argument("--platform", help="the target's platform tag (default: this host's manylinux tag)")
    parser.add_argument("--torch", default="torch", help="torch's requirement, or none to leave torch out")
    parser.add_argument("--torch-index", help="an index to take torch from too (PyTorch's, for a CPU or CUDA build)")
    parser.add_argument("--extras", default="dev,tensorboard", help="the project's extras to include")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="NAME", help="packages to leave out")
    parser.add_argument(
        "--exclude-from", type=Path, metavar="FILE", help="more packages to leave out, from a file (# comments)"
    )
    parser.add_argument("--max-mib", type=float, help="fail if the wheels come to more than this (MiB)")
    args = parser.parse_args(argv)
    if args.exclude_from:
        try:
            text = args.exclude_from.read_text()
        except OSError as e:
            parser.error(f"--exclude-from {args.exclude_from}: {e.strerror}")
        args.exclude += [w for line in text.splitlines() for w in line.split("#")[0].split()]
    try:
        here = Target.host() if not (args.python_version and args.platform) else None
        version = ".".join((args.python_version or here.python_version).split(".")[:2])  # 3.12.7 too
        target = Target(version, args.platform or here.platform)
    except ValueError as e:
        parser.error(str(e))
    torch = None if args.torch == "none" else args.torch
    try:
        files = build(args.dest, target, torch, args.torch_index, args.extras, tuple(args.exclude))
    except subprocess.CalledProcessError as e:
        print(f"wheelhouse: error: pip {e.cmd[4]} failed (its message is above)", file=sys.stderr)
        return 1
    size = sum(f.stat().st_size for f in files)
    left_out = f", leaving out {len(args.exclude)} packages" if args.exclude else ""
    print(
        f"{args.dest}: {len(files)} wheels, {size / 2**20:,.1f} MiB, for Python {target.python_version} on "
        f"{target.platform}{'' if torch else ', without torch'}{left_out}; manifest in requirements.txt and SHA256SUMS"
    )
    if args.max_mib is not None and size > args.max_mib * 2**20:
        largest = sorted(files, key=lambda f: f.stat().st_size, reverse=True)[:3]
        names = ", ".join(f"{f.name.split('-')[0]} {f.stat().st_size / 2**20:.1f} MiB" for f in largest)
        print(
            f"wheelhouse: error: {size / 2**20:.1f} MiB is over --max-mib {args.max_mib:g} (largest: {names})",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
