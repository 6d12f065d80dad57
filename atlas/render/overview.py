"""The model-diff overview (``diff/index.html``): distributions over all features, bins as links.

For two-source crosscoders: the relative decoder norm ``r = ‖d_1‖ / (‖d_0‖ + ‖d_1‖)`` of every alive
feature and the decoder cosine of the shared ones (model-diff class ``FeatureFacts.diff_class``, the one
the index's class filter and the page badges use); for S > 2: each feature's peak source. Every bar
links to the index filtered to its bin (``../index.html#rel=0.40-0.45``), which ``assets/index.js``
reads. A bin ``lo-hi`` holds ``lo ≤ x < hi`` (the last bin also ``x = hi``); the browser compares the
same float32 values with the same decimal edges, so the counts agree. The cosine bins are not uniform
(:data:`COS_EDGES`, finer near 1, where most shared features lie) and are drawn as labelled categories
of equal width; the counts are drawn on a log scale (:func:`log_height`: a bar of one feature is
visible next to one of thousands), with the exact count above each bar and in its tooltip.

Also for S = 2: the scatter data ``data/diff.js`` (:class:`OverviewData`, drawn on ``<canvas>`` by
``assets/diff.js``: relative norm × decoder cosine of every alive feature, and latent scaling
ν^ε × ν^r of the model-specific ones when the cache has it) and the lists of the most model-A-only
and model-B-only features (:func:`extreme_features`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .chunks import pack
from .features import DIFF_A_ONLY, DIFF_B_ONLY, FeatureFacts
from .index import top_token_table
from .text import chip

REL_A_ONLY = 0.3  # r below: the decoder writes mostly to source 0 (model A); default of the thresholds
REL_B_ONLY = 0.7  # r above: mostly to source 1 (model B)
REL_BINS = 20
# decoder-cosine bin edges of the shared features: finer towards 1, where most of them lie
COS_EDGES = ("-1", "0", "0.5", "0.7", "0.8", "0.9", "0.95", "0.98", "0.99", "0.995", "0.999", "1")
N_EXTREME = 20  # features in each list of the most model-A-only / model-B-only features

CHART_W, CHART_H, PAD_L, PAD_B, PAD_T, PAD_R = 640, 196, 44, 34, 26, 24


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
    """One histogram, laid out for an inline SVG (``site_templates/diff.html``); bar heights on the
    log scale of :func:`log_height`, ``y_ticks`` at powers of ten."""

    title: str
    note: str
    bars: list[Bar]
    ticks: list[tuple[float, str]]  # (x, text) under the axis
    y_max: int
    y_ticks: list[tuple[float, str]] = field(default_factory=list)  # (y, text) left of the axis
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


def bin_counts(values: np.ndarray, edges: list[str] | tuple[str, ...]) -> np.ndarray:
    """Counts of ``values`` (float32) in the bins ``[e_k, e_k+1)`` of the decimal ``edges`` (the last bin
    also holds its upper edge; NaN and values outside are not counted): the rule of ``inBin`` in
    ``assets/index.js``, compared in float64 as the browser does."""
    e = np.array([float(x) for x in edges])
    v = np.asarray(values, dtype=np.float32).astype(np.float64)
    v = v[np.isfinite(v)]
    v = v[(v >= e[0]) & (v <= e[-1])]
    idx = np.clip(np.searchsorted(e, v, side="right") - 1, 0, len(e) - 2)
    return np.bincount(idx, minlength=len(e) - 1)


def log_top(y_max: int) -> int:
    """The top of the count axis: the smallest power of ten ≥ ``y_max`` (at least 10)."""
    top = 10
    while top < y_max:
        top *= 10
    return top


def log_height(count: int, top: int, inner_h: float) -> float:
    """Pixel height of a bar of ``count`` on an axis ``0 … top`` scaled as log10(1 + count): 0 for 0, and
    a count of 1 stays visible (log10 2 / log10(1 + top) of the axis) however tall the largest bar."""
    return inner_h * float(np.log10(1 + count) / np.log10(1 + top)) if count > 0 else 0.0


def _layout(counts, labels, hrefs, ticks_at, title, note) -> Chart:
    n = len(counts)
    inner_w = CHART_W - PAD_L - PAD_R
    inner_h = CHART_H - PAD_B - PAD_T
    y_max = max(int(max(counts, default=0)), 1)
    top = log_top(y_max)
    bw = inner_w / max(n, 1)
    bars = []
    for i, (c, lab, href) in enumerate(zip(counts, labels, hrefs)):
        h = log_height(int(c), top, inner_h)
        bars.append(Bar(round(PAD_L + i * bw + 1, 2), round(PAD_T + inner_h - h, 2), round(bw - 2, 2),
                        round(h, 2), int(c), lab, href))
    ticks = [(round(PAD_L + i * bw, 2), t) for i, t in ticks_at]
    y_ticks = []
    t = 1
    while t <= top:
        y_ticks.append((round(PAD_T + inner_h - log_height(t, top, inner_h), 2), f"{t:,}"))
        t *= 10
    return Chart(title=title, note=note, bars=bars, ticks=ticks, y_max=y_max, y_ticks=y_ticks)


def rel_chart(facts: list[FeatureFacts], thresholds: tuple[float, float] = (REL_A_ONLY, REL_B_ONLY)) -> Chart:
    lo, hi = thresholds
    r = np.array([f.rel_norm for f in facts if f.alive], dtype=np.float32)
    edges = _edges(0.0, 1.0, REL_BINS)
    counts = bin_counts(r, edges)
    labels = [f"{edges[i]}–{edges[i + 1]}" for i in range(REL_BINS)]
    hrefs = [f"../index.html#rel={edges[i]}-{edges[i + 1]}" for i in range(REL_BINS)]
    ticks = [(i, edges[i]) for i in range(0, REL_BINS + 1, 4)]
    return _layout(counts, labels, hrefs, ticks, "Relative decoder norm",
                   f"r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖) of {len(r):,} alive features: r < {lo} model-A-only, "
                   f"r > {hi} model-B-only, shared between; counts on a log scale")


def cos_chart(facts: list[FeatureFacts], thresholds: tuple[float, float] = (REL_A_ONLY, REL_B_ONLY)) -> Chart:
    lo, hi = thresholds
    c = np.array([f.dec_cos for f in facts if f.alive and rel_class(f) == "shared"], dtype=np.float32)
    edges = COS_EDGES
    n = len(edges) - 1
    counts = bin_counts(c, edges)
    labels = [f"{edges[i]}–{edges[i + 1]}" for i in range(n)]
    hrefs = [f"../index.html#cls=shared&cos={edges[i]}-{edges[i + 1]}" for i in range(n)]
    ticks = [(i, edges[i]) for i in range(n + 1)]
    return _layout(counts, labels, hrefs, ticks, "Decoder cosine of shared features",
                   f"cosine(d_A, d_B) of the {len(c):,} shared features ({lo} ≤ r ≤ {hi}); the bins are "
                   "finer towards 1 and drawn with equal widths (read the edges under the axis); counts on a "
                   "log scale")


def peak_chart(facts: list[FeatureFacts], source_names: list[str]) -> Chart:
    S = len(source_names)
    counts = np.bincount([f.peak for f in facts if f.alive], minlength=S)[:S]
    labels = source_names
    hrefs = [f"../index.html#peak={s}" for s in range(S)]
    step = max(1, S // 12)
    ticks = [(s + 0.5, str(s)) for s in range(0, S, step)]
    return _layout(counts, labels, hrefs, ticks, "Peak source per feature",
                   "the source each alive feature's decoder writes to most (argmax of ‖W_dec[f, s]‖); counts "
                   "on a log scale")


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


# --------------------------------------------------------------------------- lists and scatter data


@dataclass
class ListedFeature:
    """One row of the lists of the most model-specific features (``site_templates/diff.html``)."""

    id: int
    rel_norm: float
    dec_cos: float
    tokens: list[str]  # chips of the top tokens, strongest first
    nu_err: float | None = None  # latent scaling ν^ε / ν^r (None without it, NaN where undefined)
    nu_rec: float | None = None


def extreme_features(facts: list[FeatureFacts], strings: list[str], diff_class: int, n: int = N_EXTREME,
                     has_nu: bool = False) -> list[ListedFeature]:
    """The ``n`` alive features of ``diff_class`` (``DIFF_A_ONLY``: lowest relative norm first;
    ``DIFF_B_ONLY``: highest first; ties by id) with their top tokens (``strings``: the site's token
    strings) and, with ``has_nu`` (the cache has latent scaling), their ratios ν^ε and ν^r."""
    rows = [f for f in facts if f.alive and f.diff_class == diff_class]
    sign = 1.0 if diff_class == DIFF_A_ONLY else -1.0
    rows.sort(key=lambda f: (sign * f.rel_norm, f.id))
    out = []
    for f in rows[:n]:
        out.append(ListedFeature(
            id=f.id, rel_norm=float(f.rel_norm), dec_cos=float(f.dec_cos),
            tokens=[chip(strings[t]) for t in f.top_tokens[:3]],
            nu_err=f.nu_err if has_nu else None, nu_rec=f.nu_rec if has_nu else None))
    return out


@dataclass
class OverviewData:
    """``data/diff.js`` (sites with two sources): the points of the overview's scatter plots, drawn by
    ``assets/diff.js`` on ``<canvas>``. One entry per alive feature, in id order. msgpack map:

    - ``n``: points; ``id``: bin uint32 LE feature ids
    - ``r``, ``c``: bin float32 LE relative decoder norm and decoder cosine (as ``FeatureStats``)
    - ``dc``: bin int8 model-diff class (``FeatureFacts.diff_class``)
    - ``ts``: token chip strings; ``tt``: bin uint32 LE ``n × 3``: top tokens as indices into ``ts``
      plus one (0 = none), shown on hover
    - ``ne``, ``nr``: bin float32 LE latent scaling ν^ε and ν^r (``FeatureFacts.nu_err`` / ``nu_rec``,
      from ``FeatureStats.ls_nu_*``; NaN where undefined), or ``null`` when the cache has no latent
      scaling
    - ``lo``, ``hi``: the class thresholds of ``r`` (``meta.rel_thresholds``), drawn as lines
    """

    facts: list[FeatureFacts]
    thresholds: tuple[float, float]
    has_nu: bool = False  # the cache has latent scaling (FeatureFacts.nu_err / nu_rec)

    def to_obj(self, strings: list[str]) -> dict:
        rows = [f for f in self.facts if f.alive]
        table, tt = top_token_table(rows, strings, np.uint32)
        return {
            "n": len(rows),
            "id": pack([f.id for f in rows], "u4"),
            "r": pack([f.rel_norm for f in rows], "f4"),
            "c": pack([f.dec_cos for f in rows], "f4"),
            "dc": pack([f.diff_class for f in rows], "i1"),
            "ts": table,
            "tt": pack(tt.ravel(), "u4"),
            "ne": pack([f.nu_err for f in rows], "f4") if self.has_nu else None,
            "nr": pack([f.nu_rec for f in rows], "f4") if self.has_nu else None,
            "lo": float(self.thresholds[0]),
            "hi": float(self.thresholds[1]),
        }


def nu_specific_count(facts: list[FeatureFacts]) -> int:
    """Model-specific (A-only or B-only) alive features with both ν^ε and ν^r finite: the points of the
    latent scaling scatter (0 without latent scaling, where they are NaN)."""
    return sum(1 for f in facts if f.alive and f.diff_class in (DIFF_A_ONLY, DIFF_B_ONLY)
               and np.isfinite(f.nu_err) and np.isfinite(f.nu_rec))
