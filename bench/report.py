"""Where results go and how they look: a run directory, JSON, markdown, PNG plots.

Every scenario writes ``bench/results/<scenario>-<timestamp>/`` with ``report.json``
(the numbers), ``raw.json`` (samples, subsampled to keep files small), ``summary.md``
(for people) and PNGs. Plots use matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

DEFAULT_ROOT = Path(__file__).resolve().parent / "results"
# Colour per series, chosen so direct/pinproxy/nginx/control read the same in every plot.
COLORS = {
    "direct": "#4d4d4d",
    "pinproxy": "#1f77b4",
    "pinproxy-1w": "#1f77b4",
    "pinproxy-2w": "#17becf",
    "nginx": "#2ca02c",
    "control": "#d62728",
    "v46": "#ff7f0e",
    "v47": "#1f77b4",
}


def new_run_dir(scenario: str, root: Path | None = None) -> Path:
    """A fresh ``<root>/<scenario>-<YYYYmmdd-HHMMSS>`` (suffixed if it exists)."""
    base = (root or DEFAULT_ROOT) / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True)
    return path


def _default(obj: object) -> object:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def write_json(path: Path, data: object) -> None:
    path.write_bytes(
        orjson.dumps(
            data,
            default=_default,
            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS,
        )
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
        }
    )
    return plt


def color_for(label: str) -> str | None:
    for key in sorted(COLORS, key=len, reverse=True):
        if label.startswith(key):
            return COLORS[key]
    return None


def cdf_plot(
    path: Path,
    panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
    *,
    title: str,
    xlabel: str = "latency (ms)",
    log_x: bool = True,
    marks: Sequence[float] = (50.0, 99.0),
) -> None:
    """Latency CDFs (values in ms), one panel per ``(panel title, {series: values})``.

    The y axis is "fraction of requests at or under x"; dotted lines mark p50 and p99,
    where the eye should go first.
    """
    plt = _pyplot()
    from matplotlib import ticker

    cols = len(panels)
    width = max(8.0, 5.2 * cols)
    fig, axes = plt.subplots(1, cols, figsize=(width, 4.4), squeeze=False, sharey=True)
    for ax, (panel_title, series) in zip(axes[0], panels, strict=True):
        for label, values in series.items():
            data = sorted(v for v in values if v > 0 or not log_x)
            if not data:
                continue
            n = len(data)
            ys = [(i + 1) / n for i in range(n)]
            ax.step(
                data, ys, where="post", label=f"{label} (n={n})", color=color_for(label), lw=1.6
            )
        if log_x:
            ax.set_xscale("log")
            # Plain numbers ("0.5", "20") read faster than "5x10^-1" on a latency axis.
            plain = ticker.FuncFormatter(lambda v, _pos: f"{v:g}")
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        for mark in marks:
            ax.axhline(mark / 100.0, color="#999999", ls=":", lw=0.9)
            # x in axes fractions, y in data: the label sits at the left edge whatever the scale.
            ax.text(
                0.01,
                mark / 100.0,
                f"p{mark:g}",
                va="bottom",
                fontsize=8,
                color="#666666",
                transform=ax.get_yaxis_transform(),
            )
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.set_ylim(0, 1.01)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(True, which="minor", alpha=0.12)
    axes[0][0].set_ylabel("fraction of requests ≤ x")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def bar_plot(
    path: Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    title: str,
    ylabel: str,
    annotations: Sequence[str] | None = None,
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * max(len(labels), 3) + 1.5, 4.2))
    bars = ax.bar(labels, values, color=[color_for(lbl) or "#888888" for lbl in labels])
    for bar, text in zip(bars, annotations or [f"{v:,.0f}" for v in values], strict=True):
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontweight="bold")
    ax.grid(axis="x", visible=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def histogram_plot(
    path: Path,
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    bins: int = 60,
) -> None:
    """Overlaid histograms on a shared set of bins (values in the unit of ``xlabel``)."""
    plt = _pyplot()
    everything = [v for values in series.values() for v in values]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    if everything:
        lo, hi = min(everything), max(everything)
        edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
        for label, values in series.items():
            ax.hist(
                values,
                bins=edges,
                alpha=0.55,
                label=f"{label} (n={len(values)})",
                color=color_for(label),
            )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("streams")
    ax.set_title(title, fontweight="bold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def md_header(title: str, facts: Mapping[str, Any], layout: Mapping[str, Any], command: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"- command: `{command}`",
        f"- machine: {facts.get('nproc')} CPUs, {facts.get('cpu_model')}, Python "
        f"{facts.get('python')}, load average at start {facts.get('loadavg_at_start')}",
        f"- layout: {layout.get('note') or 'not pinned (' + str(layout.get('why')) + ')'}",
        f"- note: {facts.get('note')}",
        "",
        "",
    ]
    return "\n".join(lines)


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "PASS" if ok else "MISS"
