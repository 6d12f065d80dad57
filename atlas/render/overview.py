"""The model-diff overview (``diff/index.html``): distributions over all features, bins as links.

For two-source crosscoders: the relative decoder norm ``r = ‖d_1‖ / (‖d_0‖ + ‖d_1‖)`` of every alive
feature and the decoder cosine of the shared ones (model-diff class ``FeatureFacts.diff_class``, the one
the index's class filter and the page badges use); for S > 2: each feature's peak source. Every bar
links to the index filtered to its bin (``../index.html#rel=0.40-0.45``), which ``assets/index.js``
reads. A bin ``lo-hi`` holds ``lo ≤ x < hi`` (the last bin also ``x = hi``); the browser compares the
same float32 values with the same decimal edges, so the counts agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .features import FeatureFacts

REL_A_ONLY = 0.3  # r below: the decoder writes mostly to source 0 (model A); default of the thresholds
REL_B_ONLY = 0.7  # r above: mostly to source 1 (model B)
REL_BINS = 20
COS_BINS = 20

CHART_W, CHART_H, PAD_L, PAD_B, PAD_T, PAD_R = 640, 180, 44, 34, 10, 24


@dataclass
class Bar:
    x: float
    y: float
    w: float
    h: float
    count: int
    label: str  # "0.40–0.45"
    href: str


@dataclass
class Chart:
    """One histogram, laid out for an inline SVG (``site_templates/diff.html``)."""

    title: str
    note: str
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # (x, text) under the axis
    y_max: int
    width: int = CHART_W
    height: int = CHART_H
    pad_left: int = PAD_L
    pad_bottom: int = PAD_B
    pad_top: int = PAD_T
    pad_right: int = PAD_R


CLASS_KEYS = {0: "a", 1: "shared", 2: "b"}  # FeatureFacts.diff_class → the index's ``cls`` filter value


def rel_class(f: FeatureFacts) -> str:
    """The index's class key of a feature (``a``, ``shared``, ``b``; ``""`` for none), from its
    ``diff_class``: the same value the index filter and the page badges use."""
    return CLASS_KEYS.get(f.diff_class, "")


def _edges(lo: float, hi: float, n: int) -> list[str]:
    return [f"{lo + (hi - lo) * k / n:.2f}" for k in range(n + 1)]


def _bin_counts(values: np.ndarray, edges: list[str]) -> np.ndarray:
    e = np.array([float(x) for x in edges])
    v = values[np.isfinite(values)]
    v = v[(v >= e[0]) & (v <= e[-1])]
    idx = np.clip(np.searchsorted(e, v, side="right") - 1, 0, len(e) - 2)
    return np.bincount(idx, minlength=len(e) - 1)


def _layout(counts, labels, hrefs, ticks_at, title, note) -> Chart:
    n = len(counts)
    inner_w = CHART_W - PAD_L - PAD_R
    inner_h = CHART_H - PAD_B - PAD_T
    y_max = max(int(max(counts, default=0)), 1)
    bw = inner_w / max(n, 1)
    bars = []
    for i, (c, lab, href) in enumerate(zip(counts, labels, hrefs)):
        h = inner_h * int(c) / y_max
        bars.append(Bar(round(PAD_L + i * bw + 1, 2), round(PAD_T + inner_h - h, 2), round(bw - 2, 2),
                        round(h, 2), int(c), lab, href))
    ticks = [(round(PAD_L + i * bw, 2), t) for i, t in ticks_at]
    return Chart(title=title, note=note, bars=bars, ticks=ticks, y_max=y_max)


def rel_chart(facts: list[FeatureFacts], thresholds: tuple[float, float] = (REL_A_ONLY, REL_B_ONLY)) -> Chart:
    lo, hi = thresholds
    r = np.array([f.rel_norm for f in facts if f.alive], dtype=np.float32)
    edges = _edges(0.0, 1.0, REL_BINS)
    counts = _bin_counts(r, edges)
    labels = [f"{edges[i]}–{edges[i + 1]}" for i in range(REL_BINS)]
    hrefs = [f"../index.html#rel={edges[i]}-{edges[i + 1]}" for i in range(REL_BINS)]
    ticks = [(i, edges[i]) for i in range(0, REL_BINS + 1, 4)]
    return _layout(counts, labels, hrefs, ticks, "Relative decoder norm",
                   f"r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖) of {len(r):,} alive features: r < {lo} model-A-only, "
                   f"r > {hi} model-B-only, shared between")


def cos_chart(facts: list[FeatureFacts], thresholds: tuple[float, float] = (REL_A_ONLY, REL_B_ONLY)) -> Chart:
    lo, hi = thresholds
    c = np.array([f.dec_cos for f in facts if f.alive and rel_class(f) == "shared"], dtype=np.float32)
    edges = _edges(-1.0, 1.0, COS_BINS)
    counts = _bin_counts(c, edges)
    labels = [f"{edges[i]}–{edges[i + 1]}" for i in range(COS_BINS)]
    hrefs = [f"../index.html#cls=shared&cos={edges[i]}-{edges[i + 1]}" for i in range(COS_BINS)]
    ticks = [(i, edges[i]) for i in range(0, COS_BINS + 1, 5)]
    return _layout(counts, labels, hrefs, ticks, "Decoder cosine of shared features",
                   f"cosine(d_A, d_B) of the {len(c):,} shared features ({lo} ≤ r ≤ {hi})")


def peak_chart(facts: list[FeatureFacts], source_names: list[str]) -> Chart:
    S = len(source_names)
    counts = np.bincount([f.peak for f in facts if f.alive], minlength=S)[:S]
    labels = source_names
    hrefs = [f"../index.html#peak={s}" for s in range(S)]
    step = max(1, S // 12)
    ticks = [(s + 0.5, str(s)) for s in range(0, S, step)]
    return _layout(counts, labels, hrefs, ticks, "Peak source per feature",
                   "the source each alive feature's decoder writes to most (argmax of ‖W_dec[f, s]‖)")


def overview_charts(facts: list[FeatureFacts], source_names: list[str],
                    thresholds: tuple[float, float] = (REL_A_ONLY, REL_B_ONLY)) -> list[Chart]:
    """The charts of the overview page (none for a one-source SAE); ``thresholds``: the model-diff class
    thresholds of the relative norm (``features.diff_thresholds``)."""
    S = len(source_names)
    if S == 2:
        return [rel_chart(facts, thresholds), cos_chart(facts, thresholds)]
    if S > 2:
        return [peak_chart(facts, source_names)]
    return []


def overview_classes(facts: list[FeatureFacts], n_sources: int) -> list[dict]:
    """The feature classes listed above the charts: ``{name, href, count}`` (decoder classes for S = 2,
    and dead features)."""
    out = []
    if n_sources == 2:
        for key, name, href in (("a", "model-A-only", "../index.html#cls=a"),
                                ("shared", "shared", "../index.html#cls=shared"),
                                ("b", "model-B-only", "../index.html#cls=b")):
            count = sum(1 for f in facts if f.alive and rel_class(f) == key)
            out.append({"name": name, "href": href, "count": count})
    out.append({"name": "dead", "href": "../index.html#alive=dead", "count": sum(1 for f in facts if not f.alive)})
    return out
