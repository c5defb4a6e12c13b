"""How the report's figures look: one style per model, axes whose ticks do not collide and whose
limits do not magnify a small spread, a "not enough data" panel, and one legend per figure.

    styles = model_styles(records)          # model -> Axes.plot keywords, the same in every figure
    set_axis(ax, "x", values)               # log (1-2-5 ticks) above a 3x span, else linear, >= ±5%
    not_enough(ax, "no GPU energy was measured on cpu")

Dense sizes take a sequential blue palette (light to dark as they grow) and squares; each MoE
model its own colour from a qualitative palette without blue (ordered by E, then k), with a
marker by k; once the palette is used up, colours repeat with other markers. Hollow markers are
left for flagged measurements (``harness.plausibility``).
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

NOT_ENOUGH = "not enough data"
MARKER_BY_K = {1: "^", 2: "o", 4: "D"}
OVERFLOW_MARKERS = ("v", "<", ">", "p", "h", "X")  # for MoE models past the colour palette
DENSE_SHADES = (0.45, 0.95)  # of the Blues colormap: light enough to see, dark enough to tell apart
# tab10 without its blue (dense) and grey, then the lighter tab20 partners of the same hues.
MOE_COLOURS = [plt.get_cmap("tab10")(i) for i in (1, 2, 3, 4, 5, 6, 8)] + [
    plt.get_cmap("tab20")(i) for i in (3, 5, 7, 9, 11, 13, 17)
]
LOG_SPAN = 3.0  # max / min above which an axis is logarithmic
MIN_HALF_SPAN = 0.05  # a linear axis shows at least ±5% around the centre of its values
SERIES_LINE = {"color": "0.55", "linewidth": 1.0, "zorder": 1}


def model_styles(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Model name -> ``Axes.plot`` keywords (color, marker, markerfacecolor): one style per model."""
    models = {r["model"]: r for r in records}
    dense = sorted(
        (r for r in models.values() if r["arm"] == "dense"), key=lambda r: (r["params"]["active"], r["model"])
    )
    moe = sorted(
        (r for r in models.values() if r["arm"] != "dense"),
        key=lambda r: (r["experts"], r["top_k"], r["params"]["active"], r["model"]),
    )
    blues = plt.get_cmap("Blues")
    lo, hi = DENSE_SHADES
    styles = {}
    for i, r in enumerate(dense):
        shade = hi if len(dense) == 1 else lo + (hi - lo) * i / (len(dense) - 1)
        styles[r["model"]] = {"color": blues(shade), "marker": "s", "markerfacecolor": blues(shade)}
    for i, r in enumerate(moe):
        colour = MOE_COLOURS[i % len(MOE_COLOURS)]
        turn = i // len(MOE_COLOURS)  # past the palette, another marker keeps (colour, marker) distinct
        marker = MARKER_BY_K.get(r["top_k"], "P") if turn == 0 else OVERFLOW_MARKERS[(turn - 1) % len(OVERFLOW_MARKERS)]
        styles[r["model"]] = {"color": colour, "marker": marker, "markerfacecolor": colour}
    return styles


def _compact(value: float, _pos: Any = None) -> str:
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
        target.set_major_formatter(FuncFormatter(_compact))
        target.set_minor_formatter(NullFormatter())
        set_lim(lo / 1.25, hi * 1.25)
        return
    set_scale("linear")
    target.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]))
    target.set_major_formatter(FuncFormatter(_compact))
    centre = (lo + hi) / 2
    half = max((hi - lo) / 2 * 1.15, MIN_HALF_SPAN * centre)
    set_lim(centre - half, centre + half)


def not_enough(ax, reason: str) -> None:
    """No axes, only 'not enough data: <reason>' in the middle of the panel (a figure of one such
    panel is also made low, so that it takes little room in the report)."""
    if len(ax.figure.axes) == 1:
        ax.figure.set_size_inches(ax.figure.get_figwidth(), 1.8)
    ax.set_axis_off()
    text = textwrap.fill(f"{NOT_ENOUGH}: {reason}", 48)
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="dimgray")


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
