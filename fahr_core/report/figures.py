"""Report figures rendered off-screen to PNG bytes, so reports can inline them and servers need no display.

Figures are built on ``matplotlib.figure.Figure`` with the Agg canvas rather than pyplot: no global
figure state, so concurrent report writers cannot draw into each other's figures.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

from fahr_core.survival.metrics import QUARTILE_LABELS, KMCurve
from fahr_core.survival.results import CalibrationAtHorizon

# Colour-blind-safe ramp from low (blue) to high (red) risk.
_QUARTILE_COLOURS = ("#2166ac", "#67a9cf", "#ef8a62", "#b2182b")


def figure_png(fig: Figure) -> bytes:
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
    return figure_png(fig)


def forest_png(
    rows: Sequence[tuple[str, float | None, Sequence[float] | None]],
    pooled: float | None,
    *,
    xlabel: str = "C-index (0.5 = chance, 1 = perfect ordering)",
    reference: float = 0.5,
    log_scale: bool = False,
    pooled_label: str = "Mean (n-weighted)",
    missing_text: str = "not computable",
) -> bytes:
    """Forest plot: one estimate with 95% CI per site (rows of (site, estimate, [lo, hi])), pooled diamond.

    Used for C-indices (linear axis, reference 0.5) and hazard ratios (log axis, reference 1, so HR 2 and
    HR 0.5 sit equally far from "no effect"). Sites without an estimate stay on the plot, labelled with
    ``missing_text``, so a reader sees they exist but could not be scored.
    """
    labels = [r[0] for r in rows] + ([pooled_label] if pooled is not None else [])
    fig = Figure(figsize=(6.4, 1.2 + 0.4 * len(labels)))
    ax = fig.add_subplot()
    if log_scale:
        ax.set_xscale("log")
    for y, (_, est, ci) in enumerate(rows):
        if est is None:
            # x in axes coordinates, y in data coordinates: centred whatever the scale.
            ax.text(
                0.5,
                y,
                missing_text,
                transform=ax.get_yaxis_transform(),
                ha="center",
                va="center",
                fontsize=8,
                color="grey",
            )
            continue
        if ci is not None and ci[0] is not None and ci[1] is not None:
            ax.hlines(y, ci[0], ci[1], color="black", linewidth=1.2)
        ax.plot([est], [y], marker="s", color="black")
    if pooled is not None:
        ax.plot([pooled], [len(rows)], marker="D", markersize=9, color="#b2182b")
    ax.axvline(reference, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    if log_scale:  # plain numbers (0.5, 1, 2) at round ratios, not crowded 3x10^-1 minor labels
        ax.xaxis.set_major_locator(FixedLocator([0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_xlim(0, 1)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    return figure_png(fig)


def calibration_png(horizons: Sequence[CalibrationAtHorizon]) -> bytes | None:
    """Predicted vs observed survival per bin, one panel per horizon, with the ideal diagonal.

    ``horizons`` are those of :func:`fahr_core.survival.metrics.calibration`. Observed values carry their
    Kaplan-Meier 95% CI as vertical bars. Returns None if no bin has an observed value (nothing to draw).
    """
    panels = [h for h in horizons if any(b.observed is not None for b in h.bins)]
    if not panels:
        return None
    fig = Figure(figsize=(3.2 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, h in zip(axes, panels, strict=True):
        bins = [b for b in h.bins if b.observed is not None]
        x = [b.predicted for b in bins]
        y = np.array([b.observed for b in bins], dtype=float)
        # A bin whose KM CI is undefined (e.g. nobody died: S = 1 exactly) gets no error bar.
        ci = np.array(
            [[b.observed if c is None else c for c in b.observed_ci or ()] for b in bins], dtype=float
        )
        yerr = np.clip([np.subtract(y, ci[:, 0]), ci[:, 1] - y], 0, None)
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
        ax.errorbar(x, y, yerr=yerr, fmt="o", color="#2166ac", capsize=3, label="bin (95% CI)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(f"{h.years:g} year(s)", fontsize=10)
        ax.set_xlabel("Predicted survival")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Observed survival (Kaplan-Meier)")
    axes[0].legend(loc="upper left", fontsize=7)
    return figure_png(fig)


def saliency_png(maps: dict[str, np.ndarray], mean_face: np.ndarray) -> bytes:
    """Each model's mean saliency map over the cohort's average face, side by side, one colour scale each.

    Maps are shown up to their 99th percentile so a few extreme pixels do not wash out the rest; each
    panel has its own scale because the question is *where* each model looks, not how strongly.
    """
    face = mean_face.transpose(1, 2, 0).mean(axis=2)  # grey, so the heat colours stay readable
    fig = Figure(figsize=(3.2 * len(maps), 3.6))
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (label, m) in zip(axes, maps.items(), strict=True):
        ax.imshow(face, cmap="gray", vmin=0, vmax=255)
        ax.imshow(m, cmap="inferno", alpha=0.6, vmin=0, vmax=float(np.percentile(m, 99)) or None)
        ax.set_title(label, fontsize=10)
        ax.set_axis_off()
    return figure_png(fig)
