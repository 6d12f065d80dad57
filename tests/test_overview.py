"""The model-diff overview's facts on synthetic caches: log-scaled bars, cosine bins finer near 1 that agree
with the index's filter rule, the scatter data (data/diff.js) and the lists of the most model-specific
features, each checked against a direct computation from the cache."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from atlas.cache import read_cache
from atlas.render import render_site
from atlas.render.chunks import read_chunk_script
from atlas.render.overview import COS_EDGES, N_EXTREME, bin_counts, log_height, log_top
from synthetic_cache import write_synthetic_cache


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """Two sites of the same synthetic crosscoder, with and without latent scaling."""
    root = tmp_path_factory.mktemp("overview")
    out = {}
    for name, ls in (("ls", True), ("plain", False)):
        cache = write_synthetic_cache(root / f"cache-{name}", n_features=160, n_sources=2, vocab_size=300,
                                      n_sequences=24, seq_len=40, seed=5, latent_scaling=ls)
        site = root / f"site-{name}"
        render_site(cache, site)
        out[name] = (read_cache(cache), site)
    return out


def _diff_data(site: Path) -> dict:
    name, obj = read_chunk_script((site / "data" / "diff.js").read_bytes())
    assert name == "diff"
    return obj


def _bars(html: str, chart: int) -> list[tuple[str, int, float]]:
    """(href, count, bar height) of every bar of the ``chart``-th histogram of the overview page."""
    svg = html.split('<svg class="hist"')[chart + 1].split("</svg>")[0]
    return [(href, int(n), float(h)) for href, n, h in re.findall(
        r'<a class="bin" href="([^"]+)" data-count="(\d+)".*?<rect class="bar" [^>]*height="([0-9.]+)"/>', svg)]


def _brute_bin(values: np.ndarray, lo: str, hi: str, last: bool) -> int:
    """Features in the bin ``lo ≤ x < hi`` (also x = hi for the last bin), one comparison at a time as
    assets/index.js does (float32 value, decimal edge parsed to a double)."""
    n = 0
    for v in values.astype(np.float32):
        x = float(v)
        if x >= float(lo) and (x < float(hi) or (last and x == float(hi))):
            n += 1
    return n


def test_cosine_bins_are_finer_near_one_and_agree_with_the_index_rule(sites):
    cache, site = sites["plain"]
    fs = cache.features
    shared = (fs.density > 0) & (fs.diff_class == 1)
    html = (site / "diff" / "index.html").read_text("utf-8")
    bars = _bars(html, 1)
    assert [h.split("cos=")[1] for h, _, _ in bars] == [f"{COS_EDGES[i]}-{COS_EDGES[i + 1]}"
                                                         for i in range(len(COS_EDGES) - 1)]
    widths = np.diff([float(e) for e in COS_EDGES])
    assert widths[-1] < 0.01 and widths[0] >= 1  # finer near 1
    cos = fs.dec_cos[shared]
    for k, (href, n, _h) in enumerate(bars):
        lo, hi = re.fullmatch(r"(-?[0-9.]+)-(-?[0-9.]+)", href.split("cos=")[1]).groups()
        assert n == _brute_bin(cos, lo, hi, k == len(bars) - 1), href
    assert sum(n for _, n, _ in bars) == int(shared.sum())  # the synthetic cosines lie within [-1, 1]


def test_bin_counts_edges_and_last_bin():
    """A value on an inner edge counts in the bin above it, one on the last edge in the last bin; NaN and
    values outside are not counted; float32 values are compared with the decimal edges as doubles."""
    edges = ("0.9", "0.99", "0.995", "1")
    v = np.array([0.9, 0.99, 0.995, 1.0, 0.99, 0.5, np.nan, 1.5], dtype=np.float32)
    got = bin_counts(v, edges).tolist()
    assert got == [_brute_bin(v[np.isfinite(v)], edges[k], edges[k + 1], k == 2) for k in range(3)]
    # float32(0.9) lies just below 0.9 (outside every bin), float32(0.99) and float32(0.995) just above
    # their decimal edges: the counts follow the float32 values, as in the browser
    assert float(np.float32(0.9)) < 0.9 < 0.99 < float(np.float32(0.99)) and got == [0, 2, 2]


def test_log_scale_keeps_single_features_visible():
    inner = 136.0
    for top in (10, 1_000, 1_000_000):
        assert log_height(0, top, inner) == 0
        assert log_height(1, top, inner) > 2.0  # a one-feature bar is several pixels tall
        assert log_height(top, top, inner) == pytest.approx(inner)
        hs = [log_height(c, top, inner) for c in (1, 2, 10, 100, top) if c <= top]
        assert hs == sorted(hs)
    assert [log_top(n) for n in (1, 10, 11, 3_017, 100_000)] == [10, 10, 100, 10_000, 100_000]


def test_histogram_bars_and_ticks_are_log_scaled(sites):
    _cache, site = sites["plain"]
    html = (site / "diff" / "index.html").read_text("utf-8")
    bars = _bars(html, 0)
    counts = np.array([n for _, n, _ in bars])
    top = log_top(int(counts.max()))
    svg = html.split('<svg class="hist"')[1].split("</svg>")[0]
    inner = 196 - 34 - 26
    for _href, n, h in bars:
        assert h == pytest.approx(inner * np.log10(1 + n) / np.log10(1 + top), abs=0.01)
        if n:
            assert '<text class="count"' in svg and f">{n}</text>" in svg
    ticks = re.findall(r'<text class="ylab" x="[0-9.]+" y="[0-9.]+">([0-9,]+)</text>', svg)
    assert ticks == [f"{10 ** k:,}" for k in range(len(ticks) - 1)] + ["0"]
    assert ticks[-2] == f"{top:,}"


def test_scatter_data_matches_the_cache(sites):
    for name, (cache, site) in sites.items():
        fs = cache.features
        d = _diff_data(site)
        alive = np.flatnonzero(fs.density > 0)
        ids = np.frombuffer(d["id"], "<u4")
        assert d["n"] == len(alive) and ids.tolist() == (alive + cache.manifest.feature_offset).tolist()
        assert np.array_equal(np.frombuffer(d["r"], "<f4"), fs.rel_norm[alive].astype(np.float32), equal_nan=True)
        assert np.array_equal(np.frombuffer(d["c"], "<f4"), fs.dec_cos[alive].astype(np.float32), equal_nan=True)
        assert np.frombuffer(d["dc"], "i1").tolist() == fs.diff_class[alive].tolist()
        assert (d["lo"], d["hi"]) == pytest.approx((cache.manifest.settings.diff_shared_lo,
                                                    cache.manifest.settings.diff_shared_hi))
        # top tokens: the same chips the index table shows for each feature
        tt = np.frombuffer(d["tt"], "<u4").reshape(-1, 3)
        rows = {}
        for p in sorted((site / "data" / "index").glob("*.js")):
            ch = read_chunk_script(p.read_bytes())[1]
            itt = np.frombuffer(ch["tt"], "<u2").reshape(-1, 3)
            for r in range(ch["n"]):
                rows[ch["start"] + r] = [ch["ts"][t - 1] for t in itt[r] if t]
        for k, fid in enumerate(ids.tolist()):
            assert [d["ts"][t - 1] for t in tt[k] if t] == rows[fid]
        if name == "ls":
            assert np.array_equal(np.frombuffer(d["ne"], "<f4"), fs.ls_nu_err[alive], equal_nan=True)
            assert np.array_equal(np.frombuffer(d["nr"], "<f4"), fs.ls_nu_rec[alive], equal_nan=True)
        else:
            assert d["ne"] is None and d["nr"] is None


def _listed(html: str, key: str) -> list[tuple[int, str]]:
    sec = html.split(f'id="most-{key}"')[1].split("</section>")[0]
    return [(int(i), toks) for i, toks in re.findall(r'<tr><td><a href="../f/(\d+)/index.html">\d+</a></td>.*?'
                                                     r'<td class="toks">(.*?)</td></tr>', sec)]


def test_lists_of_most_model_specific_features(sites):
    for name, (cache, site) in sites.items():
        fs = cache.features
        html = (site / "diff" / "index.html").read_text("utf-8")
        alive = fs.density > 0
        for key, cls, sign in (("a", 0, 1.0), ("b", 2, -1.0)):
            cand = [i for i in range(len(fs.rel_norm)) if alive[i] and fs.diff_class[i] == cls]
            want = sorted(cand, key=lambda i: (sign * float(fs.rel_norm[i]), i))[:N_EXTREME]
            got = _listed(html, key)
            assert [i for i, _ in got] == want and len(want) > 0
            assert all('<span class="chip">' in toks for _, toks in got)
        has_nu = "ν^ε</th>" in html
        assert has_nu == (name == "ls")
        assert ('data-plot="nu"' in html) == (name == "ls")
        if name == "ls":
            specific = alive & np.isin(fs.diff_class, [0, 2]) & np.isfinite(fs.ls_nu_err) & np.isfinite(fs.ls_nu_rec)
            assert f"The {int(specific.sum()):,} model-A-only and model-B-only features" in html


def test_one_sided_crosscoder_lists_say_none(tmp_path):
    """A class with no alive feature gets an explicit 'none' line, and the page still renders."""
    from atlas.cache import write_cache
    from synthetic_cache import make_synthetic_cache

    c = make_synthetic_cache(20, n_sources=2, vocab_size=120, n_sequences=8, seq_len=24, seed=2)
    fs = c.features
    fs.diff_class = np.where(fs.diff_class == 2, 1, fs.diff_class).astype(np.int8)  # no model-B-only feature
    write_cache(tmp_path / "cache", c)
    render_site(tmp_path / "cache", tmp_path / "site")
    html = (tmp_path / "site" / "diff" / "index.html").read_text("utf-8")
    sec = html.split('id="most-b"')[1].split("</section>")[0]
    assert "No feature in this class." in sec and "<table" not in sec
    assert _listed(html, "a")
