"""The render stage on synthetic caches: golden output, determinism, no torch, errors, site files."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from atlas.cache import read_cache
from atlas.errors import AtlasError
from atlas.render import render_site
from atlas.render.chunks import decode_payload, read_chunk_script
from atlas.render.labels import load_labels
from atlas.render.search import token_key
from atlas.render.text import visible
from atlas.render.verify import verify_site
from synthetic_cache import HOSTILE_TOKENS, write_synthetic_cache

GOLDEN = Path(__file__).parent / "golden" / "tiny"
REGEN = os.environ.get("ATLAS_REGEN_GOLDEN") == "1"
GOLDEN_TEXT = ("index.html", "f/0/index.html", "f/1/index.html", "diff/index.html", "404.html", "data/meta.js",
               "features.csv", "sitemap.xml", "atlas-site.json")


def _tiny_cache(folder: Path) -> Path:
    return write_synthetic_cache(folder, n_features=6, n_sources=2, vocab_size=80, n_sequences=10, seq_len=36,
                                 seed=3, hostile_text=True, next_token_effects="all")


def _files(site: Path) -> dict[str, bytes]:
    return {p.relative_to(site).as_posix(): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def _readable(obj):
    """A JSON-friendly view of a decoded payload (bin values as hex)."""
    if isinstance(obj, bytes):
        return "hex:" + obj.hex()
    if isinstance(obj, dict):
        return {k: _readable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_readable(v) for v in obj]
    if isinstance(obj, float) and obj != obj:
        return "NaN"
    return obj


def _decoded(site: Path) -> dict:
    out = {}
    for p in sorted(site.rglob("*.js")):
        rel = p.relative_to(site).as_posix()
        if rel.startswith("data/") and rel != "data/meta.js":
            out[rel] = _readable(read_chunk_script(p.read_bytes())[1])
    for p in sorted((site / "f").glob("*/index.html"), key=lambda q: int(q.parent.name)):
        html = p.read_text("utf-8")
        b64 = html.split('id="atlas-feature">', 1)[1].split("</script>", 1)[0]
        out[p.relative_to(site).as_posix()] = _readable(decode_payload(b64))
    return out


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cache = _tiny_cache(root / "cache")
    labels = root / "labels.json"
    labels.write_text(json.dumps({"0": {"label": "Hostile <b>label</b> & co", "explanation": "x < y"},
                                  "3": "numbers"}), "utf-8")
    site = root / "site"
    summary = render_site(cache, site, labels=labels)
    return cache, labels, site, summary


def test_golden_output(tiny_site):
    """The tiny site matches the files stored under tests/golden/tiny (ATLAS_REGEN_GOLDEN=1 rewrites them)."""
    _cache, _labels, site, _summary = tiny_site
    files = _files(site)
    hashes = {k: hashlib.sha256(v).hexdigest() for k, v in files.items() if not k.startswith("assets/")}
    decoded = _decoded(site)
    if REGEN:
        GOLDEN.mkdir(parents=True, exist_ok=True)
        (GOLDEN / "files.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n", "utf-8")
        (GOLDEN / "decoded.json").write_text(json.dumps(decoded, indent=1, sort_keys=True, ensure_ascii=False) + "\n",
                                             "utf-8")
        for rel in GOLDEN_TEXT:
            (GOLDEN / rel).parent.mkdir(parents=True, exist_ok=True)
            (GOLDEN / rel).write_bytes(files[rel])
    for rel in GOLDEN_TEXT:
        assert files[rel].decode("utf-8") == (GOLDEN / rel).read_text("utf-8"), rel
    assert decoded == json.loads((GOLDEN / "decoded.json").read_text("utf-8"))
    assert hashes == json.loads((GOLDEN / "files.json").read_text("utf-8"))


def test_assets_are_the_packaged_ones(tiny_site):
    from atlas.render.assets import asset_files

    _cache, _labels, site, _summary = tiny_site
    for rel, data in asset_files().items():
        assert (site / rel).read_bytes() == data
    assert b"sourceMappingURL" not in (site / "assets" / "msgpack.min.js").read_bytes()
    assert b"ISC" in (site / "assets" / "msgpack.LICENSE.txt").read_bytes() or \
        b"Permission to use" in (site / "assets" / "msgpack.LICENSE.txt").read_bytes()


def test_render_is_deterministic(tmp_path, tiny_site):
    cache, labels, site, _summary = tiny_site
    again = tmp_path / "elsewhere" / "out"
    render_site(cache, again, labels=labels)
    assert _files(again) == _files(site)


def test_worker_processes_write_the_same_site(tmp_path, tiny_site, monkeypatch):
    import atlas.render.site as site_mod

    cache, labels, site, summary = tiny_site
    monkeypatch.setattr(site_mod, "PAGES_PER_TASK", 2)
    out = tmp_path / "parallel"
    again = render_site(cache, out, labels=labels, workers=2)
    assert _files(out) == _files(site)
    assert again == summary

    def broken(*a, **k):
        raise RuntimeError("worker failed")

    monkeypatch.setattr(site_mod, "encode_payload", broken)
    with pytest.raises(RuntimeError, match="worker failed"):
        render_site(cache, tmp_path / "broken", labels=labels, workers=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel"]


def test_summary_and_verify(tiny_site):
    _cache, _labels, site, summary = tiny_site
    files = _files(site)
    assert summary.n_features == 6
    assert summary.n_files == len(files)
    assert summary.total_bytes == sum(len(v) for v in files.values())
    assert summary.largest_file_bytes == max(len(v) for v in files.values())
    assert verify_site(site) == []
    for rel in (".nojekyll", "404.html", "sitemap.xml", "features.csv", "diff/index.html", "atlas-site.json"):
        assert rel in files


def test_feature_page_static_facts(tiny_site):
    cache_dir, _labels, site, _summary = tiny_site
    cache = read_cache(cache_dir)
    html = (site / "f" / "0" / "index.html").read_text("utf-8")
    assert "<title>Feature 0 · Hostile &lt;b&gt;label&lt;/b&gt; &amp; co — Synthetic crosscoder</title>" in html
    assert '<meta name="description" content="Hostile &lt;b&gt;label&lt;/b&gt; &amp; co. Feature 0' in html
    assert '<meta property="og:title" content="Feature 0: Hostile &lt;b&gt;label&lt;/b&gt; &amp; co">' in html
    assert "<b>label</b>" not in html
    assert '<p class="explanation">x &lt; y</p>' in html
    assert 'href="../1/index.html"' in html and 'id="prev"' not in html
    density = float(cache.features.density[0])
    lo, hi = _score_interval(int(cache.features.n_active[0]), cache.manifest.n_tokens)
    assert f'<dt>Density</dt><dd>{100 * density:.3g}% (95% CI {100 * lo:.3g}%–{100 * hi:.3g}%)</dd>' in html
    # feature 0 has fewer than 10 active tokens: flagged, its correlations hidden (feature.js)
    n0 = int(cache.features.n_active[0])
    assert 0 < n0 < 10 and f"Low count: only {n0} active tokens (fewer than 10)" in html
    busy = int(np.argmax(cache.features.n_active))
    assert "Low count" not in (site / "f" / str(busy) / "index.html").read_text("utf-8")
    # every link is relative
    assert 'href="/' not in html and 'src="/' not in html
    # a dead feature says so and has no example panels
    dead = (site / "f" / "1" / "index.html").read_text("utf-8")
    assert "never fired" in dead and '<div id="panels" class="dead">' in dead


def _score_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% score interval by brute force: the proportions p whose score test |k - n p| ≤ z √(n p (1-p))
    does not reject, on a fine grid refined by bisection at both ends."""
    def accepted(p):
        return abs(k - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1e-12
    grid = np.linspace(0, 1, 200001)
    ok = np.flatnonzero(np.abs(k - n * grid) <= z * np.sqrt(n * grid * (1 - grid)) + 1e-12)
    ends = []
    for inside, outside in ((grid[ok[0]], grid[max(ok[0] - 1, 0)]), (grid[ok[-1]], grid[min(ok[-1] + 1, len(grid) - 1)])):
        for _ in range(60):
            mid = (inside + outside) / 2
            inside, outside = (mid, outside) if accepted(mid) else (inside, mid)
        ends.append(inside)
    return ends[0], ends[1]


def test_min_active_option(tmp_path, capsys):
    """--min-active sets the low-count threshold of the pages (meta.min_active); a negative one is refused."""
    from atlas.cli import main

    cache = _tiny_cache(tmp_path / "cache")
    site = tmp_path / "site"
    assert main(["render", str(cache), "-o", str(site), "--min-active", "3"]) in (0, None)
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    assert meta["min_active"] == 3
    n0 = int(read_cache(cache).features.n_active[0])
    assert ("Low count" in (site / "f" / "0" / "index.html").read_text("utf-8")) == (n0 < 3)
    with pytest.raises(AtlasError, match="--min-active -1 is negative"):
        render_site(cache, tmp_path / "other", min_active=-1)


def test_wilson_interval_is_the_score_interval():
    from atlas.render.pages import wilson_interval

    for k, n in ((0, 50), (1, 12_675), (7, 350), (50, 100), (100, 100)):
        lo, hi = wilson_interval(k, n)
        want_lo, want_hi = _score_interval(k, n)
        assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)
        assert lo <= k / n <= hi
    assert wilson_interval(0, 0) == (0.0, 0.0)


def test_payload_matches_cache(tiny_site):
    """Top examples in the payload: the cache's windows, quantised against the feature's max."""
    cache_dir, _labels, site, _summary = tiny_site
    cache = read_cache(cache_dir)
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    strings = []
    for k in range(meta["vocab"]["n_shards"]):
        strings += read_chunk_script((site / "data" / "vocab" / f"{k}.js").read_bytes())[1]["s"]
    html = (site / "f" / "0" / "index.html").read_text("utf-8")
    p = decode_payload(html.split('id="atlas-feature">', 1)[1].split("</script>", 1)[0])
    st = cache.manifest.settings
    W, wb = st.window, st.window_before
    ex = cache.examples
    n = int((ex.top_seq[0] >= 0).sum())
    tt = np.frombuffer(p["tt"], "<u2").reshape(n, W)
    ta = np.frombuffer(p["ta"], np.uint8).reshape(n, W)
    for e in range(n):
        seq, pos = int(ex.top_seq[0, e]), int(ex.top_pos[0, e])
        want = [int(cache.tokens[seq, q]) if 0 <= q < cache.tokens.shape[1] else -1 for q in range(pos - wb, pos - wb + W)]
        got = [strings[t] if t else None for t in tt[e]]
        assert got == [cache.vocab[t] if t >= 0 else None for t in want]
        assert ta[e, wb] == 255 if e == 0 else ta[e, wb] >= 1
        win = ex.top_window[0, e].astype(np.float32)
        assert np.all((ta[e] > 0) == (win > 0))
        assert np.allclose(ta[e] / 255 * p["max"], np.maximum(win, 0), atol=p["max"] / 255)
    assert np.allclose(np.frombuffer(p["tv"], "<f4"), ex.top_act[0, :n])
    assert p["max"] == pytest.approx(float(cache.features.max_act[0]))
    # the hostile tokens are carried as plain strings
    assert set(HOSTILE_TOKENS) <= set(strings)


def _site_strings(site: Path) -> list[str]:
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    assert meta["vocab"]["id_bytes"] == 2
    strings = []
    for k in range(meta["vocab"]["n_shards"]):
        strings += read_chunk_script((site / "data" / "vocab" / f"{k}.js").read_bytes())[1]["s"]
    return strings


def _payload(site: Path, fid: int) -> dict:
    html = (site / "f" / str(fid) / "index.html").read_text("utf-8")
    return decode_payload(html.split('id="atlas-feature">', 1)[1].split("</script>", 1)[0])


def test_payload_optional_stats_match_cache(tiny_site):
    """Correlated neurons and features, neuron alignment, diff class and next-token logits in the payload
    are the cache's valid entries, in the cache's order."""
    cache_dir, _labels, site, _summary = tiny_site
    cache = read_cache(cache_dir)
    fs, ex = cache.features, cache.examples
    S = len(cache.manifest.sources)
    for f in range(cache.manifest.n_features):
        p = _payload(site, f)
        assert p["dc"] == int(fs.diff_class[f])
        ok = fs.ncorr_dim[f] >= 0
        assert np.frombuffer(p["xs"], "<u2").tolist() == fs.ncorr_source[f][ok].tolist()
        assert np.frombuffer(p["xd"], "<u4").tolist() == fs.ncorr_dim[f][ok].tolist()
        assert np.array_equal(np.frombuffer(p["xv"], "<f2"), fs.ncorr_val[f][ok].astype(np.float16))
        ok = fs.fcorr_ids[f] >= 0
        assert np.frombuffer(p["fi"], "<u4").tolist() == fs.fcorr_ids[f][ok].tolist()
        assert np.array_equal(np.frombuffer(p["fv"], "<f2"), fs.fcorr_val[f][ok].astype(np.float16))
        assert np.frombuffer(p["as"], "<u2").tolist() == fs.align_source[f].tolist()
        assert np.frombuffer(p["ad"], "<u4").tolist() == fs.align_dim[f].tolist()
        assert np.array_equal(np.frombuffer(p["av"], "<f4"), fs.align_val[f])
        assert np.array_equal(np.frombuffer(p["af"], "<f2"), fs.align_l1_frac[f].astype(np.float16))
        # next-token logits: S values at each window position with a nonzero activation
        for key, q_key, nl, seq in (("tn", "ta", ex.top_next_logit[f], ex.top_seq[f]),
                                    ("in", "ia", ex.iv_next_logit[f], ex.iv_seq[f])):
            valid = seq >= 0
            q = np.frombuffer(p[q_key], np.uint8).reshape(-1, cache.manifest.settings.window)
            got = np.frombuffer(p[key], "<f2").reshape(-1, S)
            want = nl[valid][q > 0]
            assert np.array_equal(got, want.astype(np.float16))
            assert np.all(nl[valid][q == 0] == 0)  # nothing dropped: zero activation, zero contribution
        # centred logit effects, the B−A table, active tokens and example positions
        assert [lg["m"] for lg in p["lg"]] == cache.logits.mean[f].astype(np.float32).tolist()
        lg = cache.logits
        ids = {k: np.frombuffer(p["ld"][k], "<u2") for k in ("ti", "bi")}
        strings = _site_strings(site)
        assert [strings[i] for i in ids["ti"]] == [cache.vocab[i] for i in lg.diff_top_ids[f]]
        assert [strings[i] for i in ids["bi"]] == [cache.vocab[i] for i in lg.diff_bot_ids[f]]
        assert np.array_equal(np.frombuffer(p["ld"]["bv"], "<f4"), lg.diff_bot_vals[f])
        assert p["na"] == int(fs.n_active[f])
        assert np.frombuffer(p["tp"], "<u4").tolist() == ex.top_pos[f][ex.top_seq[f] >= 0].tolist()
        assert np.frombuffer(p["ip"], "<u4").tolist() == ex.iv_pos[f][ex.iv_seq[f] >= 0].tolist()
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    assert meta["min_active"] == 10 and [_site_strings(site)[i] for i in meta["special"]] == [cache.vocab[0]]
    # feature 0's labels of its correlated features follow the site's labels
    p0 = _payload(site, 0)
    labels = {0: "Hostile <b>label</b> & co", 3: "numbers"}
    assert p0["fl"] == [labels.get(i, "") for i in np.frombuffer(p0["fi"], "<u4").tolist()]


def test_diff_class_is_one_value_everywhere(tiny_site):
    """The page badge, the index chunk's class column and the overview's class counts agree with the
    cache's diff_class."""
    cache_dir, _labels, site, _summary = tiny_site
    cache = read_cache(cache_dir)
    fs = cache.features
    chunk = read_chunk_script((site / "data" / "index" / "0.js").read_bytes())[1]
    assert np.frombuffer(chunk["dc"], np.int8).tolist() == fs.diff_class.tolist()
    text = {0: ("a", "A-only"), 1: ("shared", "shared"), 2: ("b", "B-only")}
    for f in range(cache.manifest.n_features):
        html = (site / "f" / str(f) / "index.html").read_text("utf-8")
        key, word = text[int(fs.diff_class[f])]
        assert f'<span class="badge diff-{key}" id="diff-class"' in html and f">{word}</span></h1>" in html
    diff = (site / "diff" / "index.html").read_text("utf-8")
    alive = fs.n_active > 0
    for word, k in (("model-A-only", 0), ("shared", 1), ("model-B-only", 2)):
        n = int(((fs.diff_class == k) & alive).sum())
        assert f'>{word}</a> <span class="num">{n}</span>' in diff


def test_cache_without_optional_fields(tmp_path):
    """A cache written before the optional statistics existed renders: no optional payload keys, and the
    diff class is derived from the relative norm with the default thresholds."""
    cache = write_synthetic_cache(tmp_path / "cache", n_features=8, vocab_size=120, n_sequences=8, seq_len=40,
                                  optional_stats=False, seed=5)
    c = read_cache(cache)
    assert c.features.diff_class is None and c.examples.top_next_logit is None
    site = tmp_path / "site"
    render_site(cache, site)
    assert verify_site(site) == []
    r = c.features.rel_norm
    want = np.where(r < np.float32(0.3), 0, np.where(r > np.float32(0.7), 2, 1))
    for f in range(8):
        p = _payload(site, f)
        assert not {"xs", "xd", "xv", "fi", "fv", "fl", "as", "ad", "av", "af", "tn", "in"} & set(p)
        assert p["dc"] == want[f]
    chunk = read_chunk_script((site / "data" / "index" / "0.js").read_bytes())[1]
    assert np.frombuffer(chunk["dc"], np.int8).tolist() == want.tolist()


def test_features_csv_and_sitemap(tiny_site):
    cache_dir, _labels, site, _summary = tiny_site
    cache = read_cache(cache_dir)
    rows = list(csv.DictReader((site / "features.csv").open(encoding="utf-8")))
    assert [int(r["id"]) for r in rows] == list(range(6))
    assert rows[0]["label"] == "Hostile <b>label</b> & co"
    assert float(rows[2]["density"]) == pytest.approx(float(cache.features.density[2]), rel=1e-5)
    assert rows[2]["url"] == "f/2/"
    sm = (site / "sitemap.xml").read_text("utf-8")
    assert "<loc>f/5/</loc>" in sm and "<loc>index.html</loc>" in sm


def test_sitemap_absolute_and_split(tmp_path):
    from atlas.render.sitefiles import sitemap_files

    files = sitemap_files([f"f/{i}/" for i in range(120_001)], "https://example.org/atlas/")
    assert sorted(files) == ["sitemap-0.xml", "sitemap-1.xml", "sitemap-2.xml", "sitemap.xml"]
    assert b"<sitemapindex" in files["sitemap.xml"]
    assert b"<loc>https://example.org/atlas/sitemap-2.xml</loc>" in files["sitemap.xml"]
    assert b"<loc>https://example.org/atlas/f/0/</loc>" in files["sitemap-0.xml"]


def test_cli_site_url(tmp_path, capsys):
    """``--site-url`` (atlas render and atlas build) makes the sitemap's URLs absolute; a non-URL is refused."""
    from atlas.cli import build_parser, main

    cache = _tiny_cache(tmp_path / "cache")
    assert main(["render", str(cache), "-o", str(tmp_path / "site"), "--site-url", "https://example.org/atlas"]) == 0
    sm = (tmp_path / "site" / "sitemap.xml").read_text("utf-8")
    assert "<loc>https://example.org/atlas/f/5/</loc>" in sm and "<loc>https://example.org/atlas/index.html</loc>" in sm
    assert verify_site(tmp_path / "site") == []
    assert main(["render", str(cache), "-o", str(tmp_path / "site2"), "--site-url", "example.org"]) == 2
    assert "--site-url" in capsys.readouterr().err
    assert not (tmp_path / "site2").exists()
    assert build_parser().parse_args(["build", "--site-url", "https://x.org/"]).site_url == "https://x.org/"
    assert "sitemap.xml" in build_parser()._subparsers._group_actions[0].choices["build"].format_help()


def test_render_never_imports_torch(tmp_path):
    cache = _tiny_cache(tmp_path / "cache")
    code = (
        "import sys\n"
        "from atlas.render import render_site\n"
        "from atlas.render.verify import verify_site\n"
        f"render_site({str(cache)!r}, {str(tmp_path / 'site')!r})\n"
        f"assert verify_site({str(tmp_path / 'site')!r}) == []\n"
        "assert 'torch' not in sys.modules, 'render imported torch'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("n_sources", [1, 4])
def test_other_source_counts(tmp_path, n_sources):
    cache = write_synthetic_cache(tmp_path / "cache", n_features=5, n_sources=n_sources, vocab_size=120,
                                  n_sequences=8, seq_len=40, feature_offset=100)
    site = tmp_path / "site"
    render_site(cache, site)
    assert verify_site(site) == []
    assert (site / "f" / "100" / "index.html").is_file() and not (site / "f" / "0").exists()
    assert (site / "diff" / "index.html").exists() == (n_sources > 1)
    if n_sources == 4:
        diff = (site / "diff" / "index.html").read_text("utf-8")
        assert 'href="../index.html#peak=3"' in diff
    page = (site / "f" / "100" / "index.html").read_text("utf-8")
    assert "Relative norm" not in page


# --------------------------------------------------------------------------- errors and the output folder


def test_missing_or_unfinished_cache(tmp_path):
    with pytest.raises(AtlasError, match="atlas analyze"):
        render_site(tmp_path / "nope", tmp_path / "site")
    cache = _tiny_cache(tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["complete"] = False
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AtlasError, match="unfinished.*atlas analyze"):
        render_site(cache, tmp_path / "site")
    manifest["complete"] = True
    (cache / "manifest.json").write_text(json.dumps(manifest))
    (cache / "examples.npz").write_bytes(b"not a zip")
    with pytest.raises(AtlasError, match="atlas analyze"):
        render_site(cache, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_inconsistent_cache(tmp_path):
    cache = _tiny_cache(tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["n_features"] = 7
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AtlasError, match="inconsistent"):
        render_site(cache, tmp_path / "site")


def test_refuses_foreign_folder_and_replaces_a_site(tmp_path):
    cache = _tiny_cache(tmp_path / "cache")
    foreign = tmp_path / "docs"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(AtlasError, match="not an atlas site"):
        render_site(cache, foreign)
    assert (foreign / "thesis.tex").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "docs"]  # no staging folder left
    with pytest.raises(AtlasError, match="is a file"):
        render_site(cache, foreign / "thesis.tex")

    site = tmp_path / "site"
    site.mkdir()  # an empty folder is fine
    render_site(cache, site)
    (site / "stale.txt").write_text("from an old render")
    render_site(cache, site, title="Second")
    assert not (site / "stale.txt").exists()
    assert "Second" in (site / "index.html").read_text("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "docs", "site"]


def test_failed_render_keeps_old_site(tmp_path, monkeypatch):
    cache = _tiny_cache(tmp_path / "cache")
    site = tmp_path / "site"
    render_site(cache, site, title="Old")
    before = _files(site)

    import atlas.render.site as site_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(site_mod, "features_csv", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        render_site(cache, site, title="New")
    assert _files(site) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "site"]


def test_cli_render_and_error(tmp_path, capsys):
    from atlas.cli import main

    cache = _tiny_cache(tmp_path / "cache")
    assert main(["render", str(cache), "-o", str(tmp_path / "site"), "--title", "CLI atlas"]) == 0
    assert "CLI atlas" in (tmp_path / "site" / "index.html").read_text("utf-8")
    assert main(["render", str(tmp_path / "missing"), "-o", str(tmp_path / "site2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("atlas: error:") and "atlas analyze" in err[0]


# --------------------------------------------------------------------------- labels


def test_labels_formats(tmp_path):
    j1 = tmp_path / "a.json"
    j1.write_text(json.dumps({"3": "three", "5": {"label": "five", "explanation": "why"}}))
    assert {k: (v.label, v.explanation) for k, v in load_labels(j1).items()} == {3: ("three", ""), 5: ("five", "why")}
    j2 = tmp_path / "b.json"
    j2.write_text(json.dumps([{"id": 1, "label": "one"}, {"id": "2", "label": "two", "explanation": "e"}]))
    assert {k: v.label for k, v in load_labels(j2).items()} == {1: "one", 2: "two"}
    c = tmp_path / "c.csv"
    c.write_text("id,label,explanation\n4,\"four, quoted\",because\n6,six,\n")
    got = load_labels(c)
    assert got[4].label == "four, quoted" and got[4].explanation == "because" and got[6].label == "six"
    assert load_labels(None) == {}


@pytest.mark.parametrize("name,text,match", [
    ("bad.json", "{not json", "invalid JSON"),
    ("ids.json", '{"x": "label"}', "not an integer"),
    ("list.json", '[{"label": "no id"}]', "id"),
    ("scalar.json", "42", "neither an object nor a list"),
    ("cols.csv", "feature,text\n1,a\n", "lacks an id or label column"),
    ("neg.csv", "id,label\n-3,a\n", "negative"),
])
def test_bad_labels_files(tmp_path, name, text, match):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(AtlasError, match=match):
        load_labels(p)
    with pytest.raises(AtlasError, match="labels"):
        load_labels(tmp_path / "missing.json")


def test_labels_outside_the_site(tmp_path):
    cache = _tiny_cache(tmp_path / "cache")
    p = tmp_path / "labels.json"
    p.write_text(json.dumps({"999": "far away"}))
    with pytest.raises(AtlasError, match="no feature of this site"):
        render_site(cache, tmp_path / "site", labels=p)


# --------------------------------------------------------------------------- search index


def test_token_search_index(tiny_site):
    cache_dir, _labels, site, _summary = tiny_site
    cache = read_cache(cache_dir)
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    entries = {}
    for k in range(meta["search"]["token_shards"]):
        for e in read_chunk_script((site / "data" / "search" / f"t{k}.js").read_bytes())[1]["e"]:
            entries[e[0]] = (e[1], np.frombuffer(e[2], "<u4").tolist(), list(e[3]))
    # recompute: features whose top examples peak on a token
    expect: dict[str, dict[int, int]] = {}
    for f in range(cache.manifest.n_features):
        for e in range(cache.examples.top_seq.shape[1]):
            s = int(cache.examples.top_seq[f, e])
            if s < 0:
                continue
            key = token_key(cache.vocab[int(cache.tokens[s, cache.examples.top_pos[f, e]])])
            if key:
                expect.setdefault(key, {}).setdefault(f, 0)
                expect[key][f] += 1
    assert set(entries) == set(expect)
    for key, feats in expect.items():
        strings, ids, counts = entries[key]
        assert dict(zip(ids, counts)) == feats
        assert all(token_key(s) == key for s in strings)


def test_label_search_index(tiny_site):
    _cache, _labels, site, _summary = tiny_site
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    words = {}
    labels = {}
    for k in range(meta["search"]["label_shards"]):
        sh = read_chunk_script((site / "data" / "search" / f"l{k}.js").read_bytes())[1]
        for w, ids in sh["w"]:
            words[w] = np.frombuffer(ids, "<u4").tolist()
        labels.update({i: lab for i, lab in sh["l"]})
    assert words == {"hostile": [0], "b": [0], "label": [0], "co": [0], "numbers": [3]}
    assert labels == {0: "Hostile <b>label</b> & co", 3: "numbers"}


# --------------------------------------------------------------------------- verify


def test_verify_finds_problems(tmp_path):
    cache = _tiny_cache(tmp_path / "cache")
    site = tmp_path / "site"
    render_site(cache, site)
    assert verify_site(site) == []
    (site / "f" / "4" / "index.html").unlink()
    idx = site / "index.html"
    idx.write_text(idx.read_text("utf-8").replace('href="features.csv"', 'href="/features.csv"')
                   .replace("</main>", '<a href="f/77/index.html">x</a><script src="https://cdn.example.com/x.js">'
                            '</script></main>'), "utf-8")
    js = site / "assets" / "atlas.js"
    js.write_bytes(js.read_bytes() + b'\n// see https://evil.example/track\n')
    with open(site / "data" / "huge.bin", "wb") as fh:  # sparse: takes no disk space
        fh.truncate(101_000_000)
    problems = "\n".join(verify_site(site))
    assert "missing 1 feature pages (first: f/4/index.html)" in problems
    assert "absolute link /features.csv" in problems
    assert "broken link f/77/index.html" in problems
    assert "network URL https://cdn.example.com/x.js" in problems
    assert "assets/atlas.js: network URL https://evil.example/track" in problems
    assert "data/huge.bin is 101 MB" in problems
    assert verify_site(tmp_path / "cache")[0].startswith("atlas-site.json is missing")


def test_visible_markers():
    assert visible("a\nb\tc\x00") == "a↵b⇥c␀"
    assert visible(" the ") == " the "


# --------------------------------------------------------------------------- serve


def test_serve_serves_the_site_and_its_404(tmp_path):
    import threading
    import urllib.error
    import urllib.request

    from atlas.serve import make_server

    cache = _tiny_cache(tmp_path / "cache")
    site = tmp_path / "site"
    render_site(cache, site)
    server = make_server(site, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(base + "f/2/") as r:
            assert r.status == 200 and b'data-feature="2"' in r.read()
        with urllib.request.urlopen(base + "data/meta.js") as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "f/999/")
        assert err.value.code == 404 and b"Page not found" in err.value.read()
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(AtlasError, match="no atlas site"):
        make_server(tmp_path / "cache")


@pytest.mark.parametrize("key, value", [("special_ids", ["x"]), ("special_ids", 3), ("outlier_dims", [1, 2]),
                                        ("outlier_dims", [[0.5]]), ("corpora", ["web", "chat"]),
                                        ("corpora", [{"n_sequences": 32}]), ("corpora", 3)])
def test_bad_manifest_lists(tmp_path, key, value):
    """A manifest whose special ids or outlier dimensions are not lists of integers, or whose corpora are
    not named corpora, is refused by name."""
    cache = _tiny_cache(tmp_path / "cache")
    m = json.loads((cache / "manifest.json").read_text("utf-8"))
    m[key] = value
    (cache / "manifest.json").write_text(json.dumps(m), "utf-8")
    with pytest.raises(AtlasError, match=key):
        render_site(cache, tmp_path / "site")
