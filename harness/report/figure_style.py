"""How the report's figures look: one style per model, axes whose ticks do not collide and whose
limits do not magnify a small spread, a "not enough data" panel, and one legend per figure.

    styles = model_styles(records)          # model -> Axes.plot keywords, the same in every figure
    set_axis(ax, "x", values)               # log (1-2-5 ticks) above a 3x span, else linear, >= ±5%
    not_enough(ax, "no GPU energy was measured on cpu")

A model's style depends on that model alone, never on which others the study holds, so it is
the same in every figure and every study. Dense models are blue-green, squares, the shade set by
the width (a step per quarter octave of d_model, cycling through DENSE_COLOURS: the widths of one
study a factor < 4 apart never share one). Each MoE's hue is set by its number of experts E
(MOE_BY_E), its marker by k; a variant of the same E and k (a name that does not end in
``e<E>k<k>``: -auxfree, -nobalance, ...) takes the lighter partner of the hue and a marker chosen by
a hash of its name; the hue is darker or lighter by an octave of width (width 64 keeps it).
Hollow markers are left for flagged measurements (``harness.measure.plausibility``)
and one-seed points; where one figure shows several budgets, marker size tells them apart
(``harness.report.figures.budget_sizes``), with a legend entry per budget.
"""

from __future__ import annotations

import hashlib
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from harness.core.io import atomic_write

NOT_ENOUGH = "not enough data"
NOT_APPLICABLE = "not applicable to this study"
# Cool colours for dense models: a step per quarter octave of width, cycling every two octaves.
# Index = round(4 log2 d_model) mod 8: widths 40, 48, 56 take 5, 6, 7 (light to mid), 64, 80, 96 take 0, 1, 2.
DENSE_COLOURS = ("#2171b5", "#08519c", "#08306b", "#17becf", "#0b7a75", "#9ecae1", "#6baed6", "#4292c6")
DENSE_STEPS_PER_OCTAVE = 4
# tab10 / tab20 hues without blue (dense) and grey, keyed by E; the tab20 partner is the variant shade.
_TAB10, _TAB20 = plt.get_cmap("tab10"), plt.get_cmap("tab20")
MOE_BY_E = {2: 1, 4: 2, 8: 3, 16: 4, 32: 5, 64: 6, 128: 8}  # E -> tab10 index (orange, green, red, ...)
OTHER_E = 7  # grey, for an E the table does not name (cyan would read as dense)
MARKER_BY_K = {1: "^", 2: "o", 4: "D", 8: "v"}
VARIANT_MARKERS = ("X", "P", "*", "h", "p", "<", ">", "d")
LOG_SPAN = 3.0  # max / min above which an axis is logarithmic
MIN_HALF_SPAN = 0.05  # a linear axis shows at least ±5% around the centre of its values
SERIES_LINE = {"color": "0.55", "linewidth": 1.0, "zorder": 1}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _dense_style(r: dict[str, Any]) -> dict[str, Any]:
    width = (r.get("config") or {}).get("d_model") or math.sqrt(r["params"]["active_non_embedding"] / 48)
    colour = DENSE_COLOURS[round(DENSE_STEPS_PER_OCTAVE * math.log2(width)) % len(DENSE_COLOURS)]
    return {"color": colour, "marker": "s", "markerfacecolor": colour}


def _shade(colour, step: int) -> tuple[float, ...]:
    """``colour`` as is (step 0), darker (1) or lighter (2): one step per octave of width."""
    rgb = np.asarray(to_rgba(colour)[:3])
    toward = {0: rgb, 1: rgb * 0.6, 2: rgb + (1 - rgb) * 0.45}[step % 3]
    return (*toward, 1.0)


def _moe_style(r: dict[str, Any]) -> dict[str, Any]:
    e, k = r["experts"], r["top_k"]
    hue = MOE_BY_E.get(e, OTHER_E)
    width = (r.get("config") or {}).get("d_model") or 64
    if re.search(rf"e{e}k{k}$", r["model"]):
        base, marker = _TAB10(hue), MARKER_BY_K.get(k, "P")
    else:
        base, marker = _TAB20(2 * hue + 1), VARIANT_MARKERS[_hash(r["model"]) % len(VARIANT_MARKERS)]
    colour = _shade(base, round(math.log2(width)) - 6)  # width 64 (the cpu studies): the hue itself
    return {"color": colour, "marker": marker, "markerfacecolor": colour}


def model_styles(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Model name -> ``Axes.plot`` keywords (color, marker, markerfacecolor), each a function of that
    model alone; ordered dense by size, then MoE by E, k and name (the legend's order)."""
    models = {r["model"]: r for r in records}
    dense = sorted(
        (r for r in models.values() if r["arm"] == "dense"), key=lambda r: (r["params"]["active"], r["model"])
    )
    moe = sorted(
        (r for r in models.values() if r["arm"] != "dense"),
        key=lambda r: (r["experts"], r["top_k"], r["params"]["active"], r["model"]),
    )
    return {r["model"]: _dense_style(r) for r in dense} | {r["model"]: _moe_style(r) for r in moe}


def compact(value: float, _pos: Any = None) -> str:
    """A short tick label: 0.5, 120, 250k, 1.2M, 7e12."""
    a = abs(value)
    if a == 0:
        return "0"
    if a >= 1e9:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if a >= div:
            return f"{value / div:.3g}{suffix}"
    return f"{value:.3g}"


def set_axis(ax, axis: str, values) -> None:
    """Scale, ticks and limits of one axis for ``values`` (positive; others are ignored).

    Logarithmic where they span more than LOG_SPAN, ticks at 1, 2 and 5 per decade (1 alone over
    more than two decades) with short labels and unlabelled minor ticks, so labels do not collide;
    else linear with at most five ticks, the limits at least ±MIN_HALF_SPAN around the centre, so
    that values a few percent apart do not fill the axis."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], float)
    target = ax.xaxis if axis == "x" else ax.yaxis
    set_scale, set_lim = (ax.set_xscale, ax.set_xlim) if axis == "x" else (ax.set_yscale, ax.set_ylim)
    if v.size == 0:
        return
    lo, hi = float(v.min()), float(v.max())
    if hi / lo > LOG_SPAN:
        set_scale("log")
        subs = (1.0, 2.0, 5.0) if math.log10(hi / lo) <= 2 else (1.0,)
        target.set_major_locator(LogLocator(base=10, subs=subs))
        target.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
        target.set_major_formatter(FuncFormatter(compact))
        target.set_minor_formatter(NullFormatter())
        set_lim(lo / 1.25, hi * 1.25)
        return
    set_scale("linear")
    target.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    target.set_major_formatter(FuncFormatter(compact))
    centre = (lo + hi) / 2
    half = max((hi - lo) / 2 * 1.15, MIN_HALF_SPAN * centre)
    set_lim(centre - half, centre + half)


def save(fig: Figure, path: Path) -> Path:
    """The figure as a PNG at ``path`` (written whole or not at all), then closed."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return path


def subplots(n: int, width: float, height: float, **kw) -> tuple[Figure, np.ndarray]:
    """A row of ``n`` panels of ``width`` x ``height`` inches, with room for the legend on the right."""
    fig, axes = plt.subplots(1, n, figsize=(width * n + 1.8, height), layout="constrained", squeeze=False, **kw)
    return fig, axes[0]


def not_enough(ax, reason: str, what: str = NOT_ENOUGH) -> None:
    """No axes, only 'not enough data: <reason>' (or ``what``: <reason>) in the middle of the panel
    (a figure of one such panel is also made low, so that it takes little room in the report)."""
    if len(ax.figure.axes) == 1:
        ax.figure.set_size_inches(ax.figure.get_figwidth(), 1.8)
    ax.set_axis_off()
    text = textwrap.fill(f"{what}: {reason}", 48)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="dimgray")


def suptitle(fig: Figure, text: str) -> None:
    """A figure title of small print, wrapped to about 9 characters an inch of the figure's width
    (the legend beside the panels takes the rest)."""
    fig.suptitle(textwrap.fill(text, int(fig.get_figwidth() * 9)), fontsize=9)


def legend(fig: Figure, extra: list[tuple[Any, str]] = (), order: list[str] = ()) -> None:
    """One legend for the figure, right of the panels: each label once (those in ``order`` first, in
    that order: the models as ``model_styles`` orders them), then ``extra``."""
    seen: dict[str, Any] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    rank = {label: i for i, label in enumerate(order)}
    items = sorted(seen.items(), key=lambda kv: rank.get(kv[0], len(rank)))
    items += [(label, handle) for handle, label in extra]
    if items:
        fig.legend([h for _, h in items], [lab for lab, _ in items], loc="outside right upper", fontsize=8)
