"""Report figures rendered off-screen to PNG bytes, so reports can inline them and servers need no display.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas rather than pyplot: no global
figure state, so concurrent report writers cannot draw into each other's figures.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fahr_core.survival.metrics import QUARTILE_LABELS, KMCurve

# Colour-blind-safe ramp from low (blue) to high (red) risk.
_QUARTILE_COLOURS = ("#2166ac", "#67a9cf", "#ef8a62", "#b2182b")


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def km_quartiles_png(curves: Sequence[KMCurve]) -> bytes:
    """Kaplan-Meier survival by risk quartile, with shaded 95% CIs: well-separated curves = useful score."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for c in curves:
        colour = _QUARTILE_COLOURS[c.quartile]
        label = f"{QUARTILE_LABELS[c.quartile]}: n={c.n}, deaths={c.events}"
        ax.step(c.timeline, c.survival, where="post", color=colour, label=label)
        ax.fill_between(c.timeline, c.ci_low, c.ci_high, step="post", color=colour, alpha=0.12, linewidth=0)
    ax.set_xlabel("Years of follow-up")
    ax.set_ylabel("Proportion alive")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def forest_png(
    sites: Sequence[tuple[str, float | None, Sequence[float] | None]], mean: float | None
) -> bytes:
    """C-index with 95% CI per site (rows of (site, c_index, [lo, hi])) and the n-weighted mean as a diamond.

    Sites without a C-index stay on the plot, labelled, so a reader sees they exist but could not be scored.
    """
    labels = [s[0] for s in sites] + (["Mean (n-weighted)"] if mean is not None else [])
    fig = Figure(figsize=(6.4, 1.2 + 0.4 * len(labels)))
    ax = fig.add_subplot()
    for y, (_, c, ci) in enumerate(sites):
        if c is None:
            ax.text(
                0.5,
                y,
                "not computable",
                ha="center",
                va="center",
                fontsize=8,
                color="grey",
                backgroundcolor="white",
            )
            continue
        if ci is not None:
            ax.hlines(y, ci[0], ci[1], color="black", linewidth=1.2)
        ax.plot([c], [y], marker="s", color="black")
    if mean is not None:
        ax.plot([mean], [len(sites)], marker="D", markersize=9, color="#b2182b")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xlabel("C-index (0.5 = chance, 1 = perfect ordering)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)
