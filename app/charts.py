"""PNG charts of a segmentation model and of an elbow analysis.

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas,
never through pyplot, so there is no global figure state and the functions
can run concurrently in worker threads.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter

_DPI = 100
_FEATURE_PANELS = (
    ("avg_age", "Average age", "years"),
    ("avg_income", "Average annual income", "thousands per year"),
    ("avg_spending_score", "Average spending score", "score (1-100)"),
    ("avg_purchase_frequency", "Average purchase frequency", "purchases per year"),
)


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI, bbox_inches="tight")
    return buffer.getvalue()


def _segments(model_or_metadata: Any) -> list[Mapping[str, Any]]:
    if hasattr(model_or_metadata, "segments"):  # a SegmentationModel or a ServedModel
        return list(model_or_metadata.segments)
    metadata = model_or_metadata
    if isinstance(metadata, Mapping):
        segments = metadata.get("segments") or metadata.get("clusters")
    else:
        segments = metadata
    if not segments:
        raise ValueError("the model describes no segments")
    return list(segments)


def _label(segment: Mapping[str, Any]) -> str:
    return f"{segment['cluster_id']}: {segment['cluster_name']}"


def render_cluster_charts(model: Any) -> dict[str, bytes]:
    """Charts of a trained model's segments, as PNG bytes.

    ``model`` is a SegmentationModel, its metadata dict, or a GET /clusters
    style dict (``{"clusters": [...]}``). Returns ``{"pie_chart",
    "bar_chart", "size_chart"}``: share of customers per segment, average
    features per segment, and customers per segment.
    """
    segments = _segments(model)
    return {
        "pie_chart": _pie_chart(segments),
        "bar_chart": _bar_chart(segments),
        "size_chart": _size_chart(segments),
    }


def _pie_chart(segments: Sequence[Mapping[str, Any]]) -> bytes:
    colors = _palette(len(segments))
    fig = Figure(figsize=(9, 5.5))
    ax = fig.add_subplot()
    sizes = [s["size"] for s in segments]
    wedges, _texts, _autotexts = ax.pie(
        sizes,
        colors=colors,
        autopct=lambda pct: f"{pct:.1f}%" if pct >= 3 else "",
        startangle=90,
        counterclock=False,
        pctdistance=0.72,
        wedgeprops={"linewidth": 1, "edgecolor": "white"},
        textprops={"fontsize": 10, "color": "white", "fontweight": "bold"},
    )
    ax.set_aspect("equal")
    ax.set_title("Share of customers by segment", fontsize=13, fontweight="bold")
    ax.legend(
        wedges,
        [f"{_label(s)} ({s['size']:,})" for s in segments],
        title="Segment",
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=9,
        frameon=False,
    )
    return _png(fig)


def _panels(segments: Sequence[Mapping[str, Any]]) -> list[tuple[Any, str, str]]:
    """(value of a segment, title, unit) for each panel: the customer features, or up to four declared
    numeric features (those whose segment means spread most, relative to their size)."""
    if all(key in segments[0] for key, _, _ in _FEATURE_PANELS):
        return [(lambda s, key=key: float(s[key]), title, unit) for key, title, unit in _FEATURE_PANELS]
    means = [s.get("means") or {} for s in segments]
    numeric = [name for name, value in means[0].items() if isinstance(value, (int, float))]

    def spread(name: str) -> float:
        values = [float(m[name]) for m in means]
        return (max(values) - min(values)) / (abs(sum(values) / len(values)) + 1e-9)

    chosen = sorted(numeric, key=spread, reverse=True)[:4]
    return [(lambda s, name=name: float(s["means"][name]), f"Average {name}", name) for name in chosen]


def _bar_chart(segments: Sequence[Mapping[str, Any]]) -> bytes:
    colors = _palette(len(segments))
    ids = [str(s["cluster_id"]) for s in segments]
    panels = _panels(segments)
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (value_of, title, unit) in zip(axes.flat, panels, strict=False):
        values = [value_of(s) for s in segments]
        bars = ax.bar(ids, values, color=colors, edgecolor="black", linewidth=0.4)
        ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 10 else f"{v:.1f}" for v in values], fontsize=8, padding=2)
        ax.set_title(title, fontsize=11, fontweight="bold")
        ax.set_ylabel(unit)
        ax.set_xlabel("segment")
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    handles = [Patch(facecolor=c, edgecolor="black", linewidth=0.4) for c in colors]
    fig.legend(
        handles=handles,
        labels=[_label(s) for s in segments],
        loc="lower center",
        ncol=min(2, len(segments)),
        fontsize=9,
        frameon=False,
        bbox_to_anchor=(0.5, -0.02),
    )
    fig.suptitle("Segment profiles: average features", fontsize=13, fontweight="bold")
    fig.tight_layout(rect=(0, 0.06 + 0.025 * ((len(segments) + 1) // 2), 1, 0.97))
    return _png(fig)


def _size_chart(segments: Sequence[Mapping[str, Any]]) -> bytes:
    colors = _palette(len(segments))
    fig = Figure(figsize=(10, 0.6 * len(segments) + 1.8))
    ax = fig.add_subplot()
    labels = [_label(s) for s in segments]
    sizes = [int(s["size"]) for s in segments]
    bars = ax.barh(labels, sizes, color=colors, edgecolor="black", linewidth=0.4)
    ax.invert_yaxis()
    ax.bar_label(
        bars,
        labels=[f"{n:,} ({s['percentage']:.1f}%)" for n, s in zip(sizes, segments, strict=True)],
        padding=4,
        fontsize=9,
    )
    ax.set_xlabel("customers")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.margins(x=0.2)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title("Customers per segment", fontsize=13, fontweight="bold")
    return _png(fig)


def render_elbow_chart(elbow: Mapping[str, Any]) -> bytes:
    """Inertia and silhouette against k, with the chosen k marked; PNG bytes.

    ``elbow`` is the dict from :func:`app.ml.elbow` (``k_range``,
    ``inertias``, ``silhouette_scores``, ``optimal_k`` and optionally
    ``knee_k``).
    """
    ks = list(elbow["k_range"])
    inertias = list(elbow["inertias"])
    scores = [float("nan") if s is None else s for s in elbow["silhouette_scores"]]
    optimal = elbow.get("optimal_k")
    knee = elbow.get("knee_k")

    fig = Figure(figsize=(9, 5))
    ax = fig.add_subplot()
    inertia_color, silhouette_color = "#1f77b4", "#d62728"
    ax.plot(ks, inertias, "o-", color=inertia_color, linewidth=2, label="inertia (within-cluster sum of squares)")
    ax.set_xlabel("number of segments (k)")
    ax.set_ylabel("inertia", color=inertia_color)
    ax.tick_params(axis="y", labelcolor=inertia_color)
    ax.set_xticks(ks)
    ax.grid(alpha=0.3)

    ax2 = ax.twinx()
    ax2.plot(ks, scores, "s--", color=silhouette_color, linewidth=2, label="silhouette score")
    ax2.set_ylabel("silhouette score (higher is better)", color=silhouette_color)
    ax2.tick_params(axis="y", labelcolor=silhouette_color)

    if optimal is not None:
        ax.axvline(optimal, color="green", linestyle=":", linewidth=2, label=f"chosen k = {optimal} (best silhouette)")
    if knee is not None and knee != optimal:
        ax.axvline(knee, color="gray", linestyle="-.", linewidth=1.5, label=f"inertia elbow at k = {knee}")

    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper right", fontsize=9)
    ax.set_title("Choosing the number of segments", fontsize=13, fontweight="bold")
    return _png(fig)


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for embedding a chart in JSON."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


__all__ = ["png_data_uri", "render_cluster_charts", "render_elbow_chart"]
