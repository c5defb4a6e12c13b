"""What the wheelhouse keeps and for which platform (harness.tools.wheelhouse), on a made-up pip report.
Nothing is downloaded here: `make check-offline` (in CI) builds a real wheelhouse and installs
from it with the network closed."""

from __future__ import annotations

import pytest

from harness.tools.wheelhouse import Target, keep, needed, platforms


def _item(name: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": "1.0", "requires_dist": list(requires)}, "download_info": {}}


REPORT = {
    "install": [
        _item("App", "torch>=2", "datasets", "tomli; python_version < '3.11'", "ruff; extra == 'dev'"),
        _item("torch", "nvidia-cublas; platform_machine == 'x86_64'", "sympy", "filelock"),
        _item("nvidia_cublas"),
        _item("sympy", "mpmath"),
        _item("mpmath"),
        _item("filelock"),
        _item("datasets", "filelock", "hf-hub"),
        _item("hf_hub"),
        _item("ruff"),
    ]
}


def _kept(roots: list[str], exclude: set[str] = frozenset(), target: Target | None = None) -> tuple[list, list]:
    kept, missing = needed(REPORT, roots, set(exclude), (target or Target("3.12", "manylinux_2_28_x86_64")).markers())
    return sorted(kept), missing


def test_leaving_torch_out_leaves_out_what_only_torch_needs():
    assert _kept(["app"]) == (
        ["app", "datasets", "filelock", "hf-hub", "mpmath", "nvidia-cublas", "sympy", "torch"],
        [],
    )
    # filelock stays: datasets needs it too.
    assert _kept(["app"], {"torch"}) == (["app", "datasets", "filelock", "hf-hub"], [])
    assert _kept(["app"], {"torch", "datasets"}) == (["app"], [])


def test_extras_and_markers_are_those_of_the_target():
    assert "ruff" in _kept(["app[dev]"])[0] and "ruff" not in _kept(["app"])[0]
    arm = Target("3.12", "manylinux_2_28_aarch64")
    assert "nvidia-cublas" not in _kept(["app"], target=arm)[0]
    # pip resolved for a Python 3.12 host; a 3.10 target also needs tomli: resolved in another round.
    assert _kept(["app"], target=Target("3.10", "manylinux_2_28_x86_64"))[1] == ["tomli"]


def test_platforms_take_in_every_older_manylinux():
    tags = platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_29_x86_64" not in tags
    assert {"manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux2014_aarch64" in platforms("manylinux_2_17_aarch64")
    assert "manylinux2010_x86_64" not in platforms("manylinux_2_11_x86_64")
    assert platforms("musllinux_1_2_x86_64") == ["musllinux_1_2_x86_64"]


def test_a_target_is_a_python_version_and_a_linux_platform():
    assert Target("3.12", "manylinux_2_28_x86_64").markers()["python_full_version"].startswith("3.12")
    with pytest.raises(ValueError, match="PYTHON_VERSION=312"):
        Target("312", "manylinux_2_28_x86_64")
    with pytest.raises(ValueError, match="PLATFORM=macosx_14_0_arm64"):
        Target("3.12", "macosx_14_0_arm64")


def test_build_tools_keep_what_they_need_though_it_is_left_out():
    """pip installs hatchling into an isolated build environment that sees none of the node's
    packages: what the tools need travels even when the node has it."""
    report = {"install": [*REPORT["install"], _item("hatchling", "filelock", "mpmath")]}
    env = Target("3.12", "manylinux_2_28_x86_64").markers()
    kept, missing = keep(report, ["app", "hatchling"], ["hatchling"], {"torch", "filelock", "mpmath"}, env)
    assert {"hatchling", "filelock", "mpmath"} <= set(kept) and "torch" not in kept and not missing
    # without the tools' exemption, filelock and mpmath would be left out
    assert not {"filelock", "mpmath"} & set(
        needed(report, ["app", "hatchling"], {"torch", "filelock", "mpmath"}, env)[0]
    )
