"""The rendered site in headless Chromium (Python Playwright), over HTTP at the root, under a sub-path,
and from file://. Every page must load with a clean console: no errors, no failed requests.

Uses Debian's /usr/bin/chromium; skipped when it (or Playwright) is missing.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from atlas.cache import read_cache
from atlas.render import render_site
from atlas.render.chunks import read_chunk_script
from atlas.render.pages import fmt_num
from atlas.render.text import chip, visible
from synthetic_cache import HOSTILE_TOKENS, write_synthetic_cache
from web import base_url, serve_folder

pytestmark = pytest.mark.browser
N_FEATURES = 40
LABELS = {
    "7": {"label": "Negation in legal text", "explanation": "Fires on 'not' <script>window.__atlas_xss=9</script>"},
    "9": "<img src=x onerror=\"window.__atlas_xss=8\"> quoted",
    "12": "numbers and negation",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    cache_dir = write_synthetic_cache(root / "cache", n_features=N_FEATURES, n_sources=2, vocab_size=400,
                                      n_sequences=48, seq_len=64, hostile_text=True, seed=1,
                                      next_token_effects="all", latent_scaling=True)
    labels = root / "labels.json"
    labels.write_text(json.dumps(LABELS), "utf-8")
    site = root / "www" / "sub" / "site"
    render_site(cache_dir, site, labels=labels)
    at_root, at_parent = serve_folder(site), serve_folder(root / "www")
    bases = {
        "root": base_url(at_root),
        "sub": base_url(at_parent, "sub/site/"),
        "file": site.as_uri() + "/",
    }
    yield {"cache": read_cache(cache_dir), "site": site, "bases": bases, "root": root}
    at_root.shutdown()
    at_parent.shutdown()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors, page errors, failed requests and HTTP errors."""
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = context.new_page()
    problems: list[str] = []
    requests: list[str] = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} {r.failure}"))
    pg.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
    pg.on("request", lambda r: requests.append(r.url))
    pg.problems = problems
    pg.requests = requests
    yield pg
    context.close()
    assert problems == [], problems


def _ready(pg, url):
    pg.goto(url)
    pg.wait_for_selector("html[data-ready]", timeout=10_000)


def _row_ids(pg) -> list[int]:
    return [int(x) for x in pg.locator("#rows tr:not(.spacer) td:first-child a").all_inner_texts()]


def _all_row_ids(pg) -> list[int]:
    """Scroll the virtual table from top to bottom, collecting every row id."""
    seen: list[int] = []
    pg.evaluate("document.getElementById('table').scrollTop = 0")
    for _ in range(200):
        pg.wait_for_timeout(50)
        for i in _row_ids(pg):
            if i not in seen:
                seen.append(i)
        at_end = pg.evaluate("(() => { const t = document.getElementById('table');"
                             " const end = t.scrollTop + t.clientHeight >= t.scrollHeight - 1;"
                             " t.scrollTop += t.clientHeight * 0.8; return end; })()")
        if at_end:
            break
    return seen


# --------------------------------------------------------------------------- feature page


@pytest.mark.parametrize("where", ["root", "sub", "file"])
def test_feature_page(world, page, where):
    cache = world["cache"]
    _ready(page, world["bases"][where] + "f/0/index.html")
    ex = cache.examples
    st = cache.manifest.settings
    seq, pos = int(ex.top_seq[0, 0]), int(ex.top_pos[0, 0])
    max_token = visible(cache.vocab[int(cache.tokens[seq, pos])])
    first = page.locator("[data-panel=top] .ex").first
    tok = first.locator(".tok.max")
    assert tok.count() == 1
    assert tok.inner_text() == max_token
    n_top = int((ex.top_seq[0] >= 0).sum())
    assert page.locator("[data-panel=top] .ex").count() == n_top
    # the whole window is shown, in order
    window = [cache.tokens[seq, q] for q in range(pos - st.window_before, pos + st.window_after + 1)
              if 0 <= q < cache.tokens.shape[1]]
    assert first.locator(".tok").all_inner_texts() == [visible(cache.vocab[int(t)]) for t in window]
    # hover shows the value
    tok.hover()
    tip = page.locator("#tip")
    tip.wait_for(state="visible")
    assert fmt_num(float(ex.top_act[0, 0]), 4) in tip.inner_text()
    tip.locator(".tipid").wait_for()  # the tokenizer id arrives from data/vocab/ids<k>.js
    assert tip.locator(".tipid").inner_text().strip() == f"id {int(cache.tokens[seq, pos])}"
    # highlighting: background intensity grows with activation
    bg = first.locator(".tok.max").evaluate("e => getComputedStyle(e).backgroundColor")
    assert re.match(r"rgba\(255, 112, 0, 0\.9", bg), bg
    # the other panels
    n_groups = int(((ex.iv_seq[0] >= 0).sum(axis=1) > 0).sum())
    assert page.locator("[data-panel=intervals] .group").count() == n_groups
    assert page.locator("[data-panel=histogram] svg .bar").count() >= 1
    assert page.locator("[data-panel=logits] table.logit").count() == 6  # 2 per source and the B−A table
    assert page.locator("[data-panel=decoder] .barrow").count() == 2
    # dataset text and labels with HTML/JS payloads are text and run nothing
    assert page.evaluate("window.__atlas_xss") is None
    text = page.locator("[data-panel=top]").inner_text()
    for payload in HOSTILE_TOKENS:
        assert payload in text
    assert page.locator("main img, main svg[onload], .examples script").count() == 0


def _signed(x: float) -> str:
    return ("+" if x > 0 else "\u2212" if x < 0 else "") + fmt_num(abs(x))


def _pct(x: float) -> str:
    return fmt_num(100 * x) + "%"


def _f16(x) -> float:
    return float(np.float16(x))


@pytest.mark.parametrize("fid", [0, 4])  # features with enough active tokens for correlations
def test_new_panels_show_the_cache_values(world, page, fid):
    """Correlated neurons, correlated features, neuron alignment and the diff-class badge of a feature
    show the cache's values (as stored in the payload: correlations as float16)."""
    cache = world["cache"]
    fs = cache.features
    _ready(page, world["bases"]["sub"] + f"f/{fid}/index.html")
    # model-diff class badge in the header
    word = {0: "A-only", 1: "shared", 2: "B-only"}[int(fs.diff_class[fid])]
    assert page.locator("h1 .badge").inner_text() == word
    # correlated neurons: (source, dim, r), strongest |r| first
    ok = fs.ncorr_dim[fid] >= 0
    rows = page.locator("[data-panel=ncorr] table.neurons tbody tr")
    outliers = cache.manifest.outlier_dims  # flagged with ⚑ (the synthetic cache flags one dimension)
    want = [["AB"[s], str(d) + (" \u2691" if d in outliers[s] else ""), fmt_num(_f16(v))]
            for s, d, v in zip(fs.ncorr_source[fid][ok], fs.ncorr_dim[fid][ok], fs.ncorr_val[fid][ok])]
    assert [r.locator("td").all_inner_texts() for r in rows.all()] == want
    # on a residual-stream site the dimensions are residual dimensions; the outliers are named
    assert page.locator("#ncorr h2").inner_text() == "Correlated residual dimensions"
    assert page.locator("#alignment h2").inner_text() == "Residual dimension alignment"
    s_out = next(s for s, dims in enumerate(outliers) if dims)
    note = page.locator("[data-panel=alignment] .outliers").inner_text()
    assert f"{'AB'[s_out]} {outliers[s_out][0]}." in note and "left out of this ranking" in note
    if fid == 0:
        assert rows.first.locator(".outlier").count() == 1
    assert len(want) == cache.manifest.settings.n_corr_neurons
    s0 = int(fs.ncorr_source[fid][0])
    src = cache.manifest.sources[s0]
    assert rows.first.locator("td.src").get_attribute("title") == f"{'AB'[s0]} \u00b7 {src.model} \u00b7 {src.site}"
    # correlated features: relative links and correlations
    ok = fs.fcorr_ids[fid] >= 0
    items = page.locator("[data-panel=fcorr] li")
    assert items.count() == int(ok.sum()) > 0
    for li, i, v in zip(items.all(), fs.fcorr_ids[fid][ok], fs.fcorr_val[fid][ok]):
        assert li.locator("a").inner_text() == str(i)
        assert li.locator("a").get_attribute("href") == f"../../f/{i}/index.html"
        assert li.locator(".num").inner_text() == fmt_num(_f16(v))
    labelled = [i for i in fs.fcorr_ids[fid][ok].tolist() if str(i) in LABELS and isinstance(LABELS[str(i)], str)]
    for i in labelled:
        assert LABELS[str(i)] in page.locator("[data-panel=fcorr]").inner_text()
    # neuron alignment: the largest decoder entries and the share of the L1 norm they carry together
    rows = page.locator("[data-panel=alignment] table.neurons tbody tr")
    want = [["AB"[s], str(d) + (" \u2691" if d in outliers[s] else ""), fmt_num(float(v)), _pct(_f16(fr))] for s, d, v, fr in
            zip(fs.align_source[fid], fs.align_dim[fid], fs.align_val[fid], fs.align_l1_frac[fid])]
    assert [r.locator("td").all_inner_texts() for r in rows.all()] == want
    total = sum(_f16(x) for x in fs.align_l1_frac[fid])
    assert page.locator("[data-panel=alignment] .align-total").inner_text() == _pct(total)
    assert abs(total - float(fs.align_l1_frac[fid].sum())) < 2e-3
    # a link opens the correlated feature
    target = int(fs.fcorr_ids[fid][0])
    items.first.locator("a").click()
    page.wait_for_url(re.compile(rf"/sub/site/f/{target}/index\.html$"))
    page.wait_for_selector("html[data-ready]")


def test_honest_feature_page(world, page):
    """Small-sample flags, token positions, marked special tokens and sequence starts, neighbours with
    their top tokens, centred logit effects and the B−A table."""
    from atlas.render.features import WindowTokens, feature_facts
    from atlas.render.pages import wilson_interval
    from atlas.render.vocab import build_site_vocab

    cache = world["cache"]
    fs, ex, lg = cache.features, cache.examples, cache.logits
    wb = cache.manifest.settings.window_before
    # a feature with 3 active tokens: flagged, its correlations hidden, its density interval shown
    assert int(fs.n_active[3]) == 3
    _ready(page, world["bases"]["root"] + "f/3/index.html")
    assert "only 3 active tokens (fewer than 10)" in page.locator("#low-count").inner_text()
    for name in ("fcorr", "ncorr"):
        body = page.locator(f"[data-panel={name}]")
        assert body.locator(".low-count").inner_text().startswith("Hidden: a correlation over only 3 active tokens")
        assert body.locator("li, tr").count() == 0
    lo, hi = wilson_interval(3, cache.manifest.n_tokens)
    assert f"(95% CI {_pct(lo)}–{_pct(hi)})" in page.locator("dl.facts").inner_text()
    # feature 0: enough tokens, no flag
    _ready(page, world["bases"]["root"] + "f/0/index.html")
    assert page.locator("#low-count").count() == 0 and page.locator(".low-count").count() == 0
    rows = page.locator("[data-panel=top] .ex")
    n_top = int((ex.top_seq[0] >= 0).sum())
    assert rows.locator(".expos").all_inner_texts() == [f"@{int(p)}" for p in ex.top_pos[0, :n_top]]
    starts = 0
    for e in range(n_top):
        seq, pos = int(ex.top_seq[0, e]), int(ex.top_pos[0, e])
        row = rows.nth(e)
        window = [int(cache.tokens[seq, q]) for q in range(max(0, pos - wb), pos + 1)]
        assert row.locator(".tok.special").count() >= window.count(0)  # BOS (id 0) is the special token
        assert row.locator(".seqstart").count() == (1 if pos - wb <= 0 else 0)
        if pos - wb <= 0:
            starts += 1
            nxt = row.locator(".seqstart + .tok")
            assert "special" in nxt.get_attribute("class") and nxt.inner_text() == visible(cache.vocab[0])
    assert starts > 0
    # neighbours and correlated features show their top tokens (as the index has them)
    vocab = build_site_vocab(cache)
    facts = feature_facts(cache, WindowTokens(cache, vocab), 0, cache.manifest.n_features).facts
    page.locator("[data-panel=neighbours] li .ntoks").first.wait_for()
    checked = 0
    for li in page.locator("[data-panel=neighbours] li, [data-panel=fcorr] li").all():
        fid = int(li.get_attribute("data-id"))
        want = [chip(vocab.strings[t]) for t in facts[fid].top_tokens[:3]]
        got = li.locator(".ntoks .chip").all_inner_texts()
        assert got == want, (fid, got, want)
        checked += bool(want)
    assert checked > 0
    # centred logit effects: the subtracted mean per source; the B−A table's first rows
    note = page.locator("[data-panel=logits] .outliers").inner_text()
    assert "Outlier residual dimensions" in note and "They are left out of these effects" in note
    s_out = next(s for s, dims in enumerate(cache.manifest.outlier_dims) if dims)
    assert f"They hold {_pct(float(lg.outlier_share[0, s_out]))} via {'AB'[s_out]} of this decoder" in note
    notes = page.locator("[data-panel=logits] .centred").all_inner_texts()
    assert [n.split("(")[1].split(")")[0] for n in notes] == [_signed(float(m)) for m in lg.mean[0]]
    diff = page.locator("[data-panel=logits] .logit-diff")
    grows, shrinks = diff.locator("table.logit.pos tr"), diff.locator("table.logit.neg tr")
    assert grows.count() == lg.diff_top_ids.shape[1]
    assert grows.first.locator(".chip").inner_text() == chip(cache.vocab[int(lg.diff_top_ids[0, 0])])
    assert shrinks.first.locator(".num").inner_text() == fmt_num(float(lg.diff_bot_vals[0, 0]))


def test_outlier_note_names_dimensions_shared_by_both_sources_once(world, page):
    """When A and B flag the same dimensions the note lists them once, "in A and B"; an older cache
    (logit tables with the outliers in) says that they count in the effects."""
    meta_js = (world["site"] / "data" / "meta.js").read_text("utf-8")
    meta = json.loads(meta_js[len("Atlas.meta("):-len(");\n")])

    def serve(changes):
        body = "Atlas.meta(" + json.dumps(meta | changes) + ");\n"
        page.route("**/data/meta.js", lambda route: route.fulfill(body=body, content_type="text/javascript"))

    serve({"outlier_dims": [[3, 41], [3, 41]], "outlier_factor": 5})
    _ready(page, world["bases"]["root"] + "f/0/index.html")
    note = page.locator("[data-panel=logits] .outliers").inner_text()
    assert "above 5\u00d7 the median" in note and "): 3, 41 in A and B. They are left out of these effects" in note
    page.unroute("**/data/meta.js")
    serve({"logits_without_outliers": False})
    _ready(page, world["bases"]["root"] + "f/0/index.html")
    note = page.locator("[data-panel=logits] .outliers").inner_text()
    assert "Their entries count in these effects" in note and "left out" not in note


def test_hover_shows_next_token_logit(world, page):
    """Each example token's tooltip gives its contribution to the next token's logit, per source."""
    cache = world["cache"]
    ex = cache.examples
    st = cache.manifest.settings
    wb, T = st.window_before, cache.tokens.shape[1]
    _ready(page, world["bases"]["root"] + "f/0/index.html")
    tip = page.locator("#tip")
    checked = 0
    for e in range(3):
        seq, pos = int(ex.top_seq[0, e]), int(ex.top_pos[0, e])
        page.locator("[data-panel=top] .ex").nth(e).locator(".tok.max").hover()
        tip.wait_for(state="visible")
        nxt = tip.locator(".tipnext")
        if pos + 1 >= T:
            assert nxt.inner_text() == "\u2192 no next token (end of the sequence)"
            continue
        vals = ex.top_next_logit[0, e, wb]
        want = " \u00b7 ".join(f"{_signed(float(v))} {'AB'[s]}" for s, v in enumerate(vals))
        nt = chip(cache.vocab[int(cache.tokens[seq, pos + 1])])
        assert nxt.inner_text() == f"\u2192 next token {nt} logit {want}"
        assert "direct effect" in tip.locator(".tipdef").inner_text()
        checked += 1
    assert checked
    # an inactive token contributes nothing
    first = page.locator("[data-panel=top] .ex").first
    zero = first.locator(".tok:not([style])").first
    zero.hover()
    assert page.locator("#tip .tipnext").inner_text().endswith(" logit 0") or \
        page.locator("#tip .tipnext").inner_text().startswith("\u2192 no next token")
    # interval examples carry them too (iv_next_logit)
    page.locator("[data-panel=intervals] .tok.centre").first.hover()
    assert page.locator("#tip .tipnext").count() == 1


def test_old_cache_renders_clean(world, page):
    """A cache without the optional statistics: the page renders, without the new panels or next-token
    lines, with a clean console (checked by the page fixture); the badge comes from the relative norm."""
    root = world["root"]
    cache_dir = write_synthetic_cache(root / "cache-old", n_features=6, vocab_size=200, n_sequences=10, seq_len=40,
                                      optional_stats=False, seed=2)
    site = root / "site-old"
    render_site(cache_dir, site)
    cache = read_cache(cache_dir)
    r = float(cache.features.rel_norm[0])
    _ready(page, site.as_uri() + "/f/0/index.html")
    for name in ("ncorr", "fcorr", "alignment"):
        assert page.locator(f"[data-panel={name}]").count() == 0
    assert page.locator("[data-panel=neighbours] li").count() >= 1
    assert page.locator("h1 .badge").inner_text() == ("A-only" if r < 0.3 else "B-only" if r > 0.7 else "shared")
    page.locator("[data-panel=top] .tok.max").first.hover()
    page.locator("#tip").wait_for(state="visible")
    assert page.locator("#tip .tipnext").count() == 0
    _ready(page, site.as_uri() + "/index.html")
    assert page.locator("#rows td.cls .badge").count() == 6
    # filters of columns this site lacks (ν, special-token share) are ignored, not applied to missing values
    page.goto("about:blank")
    _ready(page, site.as_uri() + "/index.html#nue=0.2&nur=0.1&smax=0.5")
    assert page.locator("#count").inner_text().startswith("6 of 6 features")


def test_hostile_label_is_text(world, page):
    _ready(page, world["bases"]["root"] + "f/9/index.html")
    assert page.locator("h1 .label").inner_text() == LABELS["9"]
    _ready(page, world["bases"]["root"] + "f/7/index.html")
    assert "<script>window.__atlas_xss=9</script>" in page.locator(".explanation").inner_text()
    assert page.evaluate("window.__atlas_xss") is None


# --------------------------------------------------------------------------- index


@pytest.mark.parametrize("where", ["root", "file"])
def test_index_lists_sorts_and_filters(world, page, where):
    cache = world["cache"]
    fs = cache.features
    _ready(page, world["bases"][where] + "index.html")
    assert page.locator("#count").inner_text().startswith(f"{N_FEATURES} of {N_FEATURES} features")
    assert len(_row_ids(page)) < N_FEATURES  # virtualised: only the rows in view exist
    assert sorted(_all_row_ids(page)) == list(range(N_FEATURES))
    page.evaluate("document.getElementById('table').scrollTop = 0")
    page.wait_for_timeout(50)
    words = {0: "A-only", 1: "shared", 2: "B-only"}
    for tr in page.locator("#rows tr:not(.spacer)").all()[:10]:
        i = int(tr.locator("td").first.inner_text())
        assert tr.locator("td.cls .badge").inner_text() == words[int(fs.diff_class[i])]

    page.click("th[data-key=density] button")  # descending first
    page.evaluate("document.getElementById('table').scrollTop = 0")
    page.wait_for_timeout(50)
    assert _row_ids(page)[0] == int(np.argmax(fs.density))
    page.click("th[data-key=density] button")  # ascending: dead features first, by id
    page.wait_for_timeout(50)
    assert _row_ids(page)[0] == int(np.flatnonzero(fs.density == fs.density.min())[0])
    assert "sort=density" in page.url

    page.select_option("#f-alive", "dead")
    assert sorted(_all_row_ids(page)) == np.flatnonzero(fs.density == 0).tolist()
    page.click("#f-reset")
    page.select_option("#f-cls", "b")
    want_b = np.flatnonzero((fs.density > 0) & (fs.rel_norm > 0.7)).tolist()
    assert want_b == np.flatnonzero((fs.density > 0) & (fs.diff_class == 2)).tolist()
    assert sorted(_all_row_ids(page)) == want_b
    assert set(page.locator("#rows td.cls .badge").all_inner_texts()) == {"B-only"}
    assert page.locator("#count").inner_text().startswith(f"{len(want_b)} of")
    page.click("#f-reset")
    page.fill("#f-dmin", "0.01")
    page.press("#f-dmin", "Enter")
    page.locator("#f-dmin").dispatch_event("change")
    want = np.flatnonzero(fs.density >= np.float32(0.01)).tolist()
    assert sorted(_all_row_ids(page)) == want
    assert "dens=" in page.url
    for dens, lo, hi in (("1e-3-1", 1e-3, 1), ("1e-5-1e-2", 1e-5, 1e-2), (".005-0.5", 0.005, 0.5)):
        page.goto("about:blank")  # a shared link with an exponent in the range
        _ready(page, world["bases"][where] + f"index.html#dens={dens}")
        want = np.flatnonzero((fs.density >= np.float32(lo)) & (fs.density <= np.float32(hi))).tolist()
        assert 0 < len(want) and sorted(_all_row_ids(page)) == want, dens


def test_latent_scaling_columns_filters_and_panel(world, page):
    """ν^ε / ν^r: index columns (sortable, NaN last), the ≤ filters and the hash, and the page section."""
    fs = world["cache"].features
    nue = fs.ls_nu_err.astype(np.float32)
    _ready(page, world["bases"]["root"] + "index.html#nue=0.3")
    want = np.flatnonzero(nue <= np.float32(0.3)).tolist()
    assert want and len(want) < N_FEATURES
    assert sorted(_all_row_ids(page)) == want
    assert page.locator("#f-nue").input_value() == "0.3"
    page.click("#f-reset")
    page.fill("#f-nur", "0.5")
    page.locator("#f-nur").dispatch_event("change")
    assert sorted(_all_row_ids(page)) == np.flatnonzero(fs.ls_nu_rec.astype(np.float32) <= np.float32(0.5)).tolist()
    assert "nur=0.5" in page.url
    page.click("#f-reset")
    page.click("th[data-key=nue] button")  # descending first, NaN (dead features) last
    page.evaluate("document.getElementById('table').scrollTop = 0")
    page.wait_for_timeout(50)
    assert _row_ids(page)[0] == int(np.nanargmax(nue))
    first = page.locator("#rows tr:not(.spacer)").first
    cells = first.locator("td").all_inner_texts()
    assert fmt_num(float(nue[np.nanargmax(nue)]), 2) in cells

    fid = int(np.flatnonzero(fs.n_active > 0)[0])
    _ready(page, world["bases"]["file"] + f"f/{fid}/index.html")
    assert page.locator("#nu-err").inner_text() == fmt_num(float(fs.ls_nu_err[fid]))
    assert page.locator("#nu-rec").inner_text() == fmt_num(float(fs.ls_nu_rec[fid]))
    assert page.locator("table.betas tbody tr").count() == 4
    dead = int(np.flatnonzero(fs.n_active == 0)[0])
    _ready(page, world["bases"]["file"] + f"f/{dead}/index.html")
    assert page.locator("#latent-scaling").count() == 0


def test_search(world, page):
    site = world["site"]
    base = world["bases"]["sub"]
    _ready(page, base + "index.html")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    results = page.locator("#search-results a.result")

    def search(q: str) -> list[int]:
        page.fill("#q", q)
        page.wait_for_function("q => document.getElementById('search-results').getAttribute('data-q') === q", arg=q)
        return [int(x) for x in results.locator(".rid").all_inner_texts()]

    # by label word (prefix), intersecting words
    before = len([u for u in page.requests if "/data/search/" in u])
    page.keyboard.type("negat")
    page.wait_for_function("document.querySelectorAll('#search-results a.result').length === 2")
    assert sorted(int(x) for x in results.locator(".rid").all_inner_texts()) == [7, 12]
    assert sorted(_row_ids(page)) == [7, 12]  # the table shows the matches
    label_loads = [u for u in page.requests if "/data/search/" in u][before:]
    assert len(label_loads) <= 2 and all(re.search(r"/data/search/[lt]\d+\.js$", u) for u in label_loads)
    assert search("legal negation") == [7]

    # by token: the features whose top examples peak on it
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    entries = []
    for k in range(meta["search"]["token_shards"]):
        entries += read_chunk_script((site / "data" / "search" / f"t{k}.js").read_bytes())[1]["e"]
    key, _strings, ids, _counts = max(entries, key=lambda e: (len(e[2]), e[0]))
    best = int(np.frombuffer(ids, "<u4")[0])
    assert best in search(key)
    assert search("no-such-thing-zz") == []
    assert "No feature matches" in page.locator("#search-results").inner_text()

    # by id: Enter opens the page
    assert search("23")[0] == 23
    page.press("#q", "Enter")
    page.wait_for_url(re.compile(r"/sub/site/f/23/index\.html$"))
    page.wait_for_selector("html[data-ready]")


# --------------------------------------------------------------------------- overview, embed, keys


def test_overview_bins_link_to_features(world, page):
    cache = world["cache"]
    fs = cache.features
    _ready_plain = world["bases"]["root"] + "diff/index.html"
    page.goto(_ready_plain)
    bins = page.locator("svg.hist").first.locator("a.bin")
    counts = [int(x) for x in bins.evaluate_all("els => els.map(e => e.getAttribute('data-count'))")]
    assert sum(counts) == int((fs.density > 0).sum())
    i = int(np.argmax(counts))
    bins.nth(i).locator("rect.hit").click()
    page.wait_for_selector("html[data-ready]")
    assert "#rel=" in page.url
    assert page.locator("#count").inner_text().startswith(f"{counts[i]} of")
    lo, hi = (float(x) for x in re.search(r"rel=([0-9.]+)-([0-9.]+)", page.url).groups())
    ids = _all_row_ids(page)
    assert len(ids) == counts[i]
    assert all(lo <= fs.rel_norm[j] < hi or fs.rel_norm[j] == hi == 1.0 for j in ids)
    page.locator(f"#rows a:text-is('{ids[0]}')").click()
    page.wait_for_selector("html[data-ready]")
    assert page.url.endswith(f"/f/{ids[0]}/index.html")


CLASS_COLOURS = {0: (0x2F, 0x7D, 0x4F), 1: (0x5D, 0x66, 0x75), 2: (0xA8, 0x45, 0x2A)}  # --a, --shared, --b


def _isolated(points: list, gap: float = 16.0) -> list:
    """The points [id, x, y] with no other point within ``gap`` client pixels."""
    xy = np.array([[p[1], p[2]] for p in points])
    out = []
    for k, p in enumerate(points):
        d = np.hypot(*(xy - xy[k]).T)
        d[k] = np.inf
        if d.min() > gap:
            out.append(p)
    return out


def _pixels(page, plot: str, points: list) -> list[list[int]]:
    """RGBA of the canvas ``plot`` at the client positions of ``points`` ([id, x, y]), one readback."""
    return page.evaluate("([plot, pts]) => { const c = document.querySelector(`canvas[data-plot=${plot}]`);"
                         " const b = c.getBoundingClientRect();"
                         " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                         " return pts.map(([id, x, y]) => { const px = Math.round((x - b.left) * c.width / b.width),"
                         " py = Math.round((y - b.top) * c.height / b.height), o = 4 * (py * c.width + px);"
                         " return Array.from(d.slice(o, o + 4)); }); }", [plot, points])


def _index_tokens(site) -> dict[int, list[str]]:
    out = {}
    for p in sorted((site / "data" / "index").glob("*.js")):
        ch = read_chunk_script(p.read_bytes())[1]
        tt = np.frombuffer(ch["tt"], "<u2").reshape(-1, 3)
        for r in range(ch["n"]):
            out[ch["start"] + r] = [ch["ts"][t - 1] for t in tt[r] if t]
    return out


@pytest.mark.parametrize("where", ["root", "file"])
def test_overview_scatter_plots(world, page, where):
    """Both scatter plots are drawn (every point in its class colour), sit where their values say, show a
    feature's id and top tokens on hover, and open its page on click; the lists show top tokens."""
    fs = world["cache"].features
    alive = fs.density > 0
    tokens = _index_tokens(world["site"])
    specific = alive & np.isin(fs.diff_class, [0, 2]) & np.isfinite(fs.ls_nu_err) & np.isfinite(fs.ls_nu_rec)
    for plot, want, xs, ys in (("rel", alive, fs.rel_norm, fs.dec_cos), ("nu", specific, fs.ls_nu_err, fs.ls_nu_rec)):
        _ready(page, world["bases"][where] + "diff/index.html")
        canvas = page.locator(f"canvas[data-plot={plot}]")
        canvas.scroll_into_view_if_needed()
        points = page.evaluate(f"Atlas.diffPlots.{plot}.points()")
        assert sorted(p[0] for p in points) == np.flatnonzero(want).tolist()
        # positions follow the values: x grows with the first, y (downwards) shrinks with the second
        if plot == "rel":
            by_x = sorted(points, key=lambda p: (float(xs[p[0]]), p[1]))
            assert all(a[1] <= b[1] + 1e-3 for a, b in zip(by_x, by_x[1:]))
            by_y = sorted(points, key=lambda p: (float(ys[p[0]]), -p[2]))
            assert all(a[2] >= b[2] - 1e-3 for a, b in zip(by_y, by_y[1:]))
        lone = _isolated(points)
        assert lone
        for (fid, _x, _y), rgba in zip(lone, _pixels(page, plot, lone)):
            want_rgb = CLASS_COLOURS[int(fs.diff_class[fid])]
            assert rgba[3] > 100 and max(abs(a - b) for a, b in zip(rgba, want_rgb)) <= 8, (fid, rgba)
        fid, x, y = lone[len(lone) // 2]
        page.mouse.move(x + 2, y + 1)
        tip = page.locator(".tip:not([hidden])")
        tip.wait_for()
        text = tip.inner_text()
        assert text.startswith(f"feature {fid} ") and all(t in text for t in tokens[fid]), text
        page.mouse.click(x + 2, y + 1)
        page.wait_for_url(re.compile(rf"/f/{fid}/index\.html$"))
        page.wait_for_selector("html[data-ready]")
    # the lists: the most model-B-only feature first, with its top tokens
    _ready(page, world["bases"][where] + "diff/index.html")
    b_only = np.flatnonzero(alive & (fs.diff_class == 2))
    top_b = int(b_only[np.argmax(fs.rel_norm[b_only])])
    row = page.locator("#most-b tbody tr").first
    assert row.locator("td a").inner_text() == str(top_b)
    assert row.locator("td.toks .chip").all_inner_texts() == tokens[top_b]
    assert page.locator("#most-a tbody tr").count() == min(20, int((alive & (fs.diff_class == 0)).sum()))
    row.locator("td a").click()
    page.wait_for_selector("html[data-ready]")
    assert page.url.endswith(f"/f/{top_b}/index.html")


def test_overview_fine_cosine_bin_agrees_with_index(world, page):
    """The narrowest non-empty cosine bin (near 1) links to the index filtered to the same features."""
    fs = world["cache"].features
    page.goto(world["bases"]["root"] + "diff/index.html")
    bins = page.locator("svg.hist").nth(1).locator("a.bin")
    counts = [int(x) for x in bins.evaluate_all("els => els.map(e => e.getAttribute('data-count'))")]
    k = max(i for i, n in enumerate(counts) if n > 0)
    bins.nth(k).locator("rect.hit").click()
    page.wait_for_selector("html[data-ready]")
    lo, hi = (float(x) for x in re.search(r"cos=(-?[0-9.]+)-(-?[0-9.]+)", page.url).groups())
    assert hi - lo <= 0.05
    ids = _all_row_ids(page)
    want = [i for i in np.flatnonzero((fs.density > 0) & (fs.diff_class == 1))
            if lo <= float(fs.dec_cos[i]) < hi or float(fs.dec_cos[i]) == hi == 1.0]
    assert sorted(ids) == want and len(ids) == counts[k]


def test_embed_permalink_and_keys(world, page):
    base = world["bases"]["root"]
    _ready(page, base + "f/5/index.html?embed")
    assert not page.locator("header.bar").is_visible()
    assert page.locator("[data-panel=top] .tok.max").count() >= 1
    page.keyboard.press("j")
    page.wait_for_url(re.compile(r"/f/6/index\.html\?embed$"))
    page.wait_for_selector("html[data-ready]")

    _ready(page, base + "f/5/index.html")
    assert page.locator("header.bar").is_visible()
    page.click("#copy-link")
    assert page.locator("#share-text").input_value() == base + "f/5/"
    page.click("#embed-code")
    assert 'src="' + base + 'f/5/index.html?embed"' in page.locator("#share-text").input_value()
    page.locator("body").click(position={"x": 5, "y": 300})
    page.keyboard.press("ArrowLeft")
    page.wait_for_url(re.compile(r"/f/4/index\.html$"))
    page.wait_for_selector("html[data-ready]")
    page.keyboard.press("k")
    page.wait_for_url(re.compile(r"/f/3/index\.html$"))


def test_wide_token_ids(world, page, monkeypatch):
    """Sites whose shown vocabulary exceeds 65,535 tokens store token ids as uint32."""
    from atlas.render.vocab import SiteVocab

    monkeypatch.setattr(SiteVocab, "id_kind", property(lambda self: "u4"))
    root = world["root"]
    cache_dir = write_synthetic_cache(root / "cache-wide", n_features=4, vocab_size=150, n_sequences=10, seq_len=40)
    site = root / "site-wide"
    render_site(cache_dir, site)
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    assert meta["vocab"]["id_bytes"] == 4
    cache = read_cache(cache_dir)
    seq, pos = int(cache.examples.top_seq[0, 0]), int(cache.examples.top_pos[0, 0])
    _ready(page, site.as_uri() + "/f/0/index.html")
    assert page.locator("[data-panel=top] .ex").first.locator(".tok.max").inner_text() == \
        visible(cache.vocab[int(cache.tokens[seq, pos])])
    assert page.locator("[data-panel=logits] .chip").first.inner_text() != ""


@pytest.mark.parametrize("n_sources", [1, 4])
def test_other_source_counts(world, page, n_sources):
    root = world["root"]
    cache = write_synthetic_cache(root / f"cache{n_sources}", n_features=6, n_sources=n_sources, vocab_size=200,
                                  n_sequences=10, seq_len=40, feature_offset=50)
    site = root / f"site{n_sources}"
    render_site(cache, site)
    _ready(page, site.as_uri() + "/f/50/index.html")
    assert page.locator("[data-panel=decoder] .barrow").count() == n_sources
    assert page.locator("[data-panel=logits] table.logit").count() == 2 * n_sources
    _ready(page, site.as_uri() + "/index.html")
    assert sorted(_all_row_ids(page)) == list(range(50, 56))
    if n_sources == 4:
        page.goto(site.as_uri() + "/diff/index.html")
        bins = page.locator("a.bin")
        assert bins.count() == 4
        counts = [int(x) for x in bins.evaluate_all("els => els.map(e => e.getAttribute('data-count'))")]
        k = int(np.argmax(counts))
        bins.nth(k).locator("rect.hit").click()
        page.wait_for_selector("html[data-ready]")
        assert len(_all_row_ids(page)) == counts[k]
