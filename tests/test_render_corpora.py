"""Named corpora and special-token shares on the site: page rows, index columns and filters, meta, CSV."""

from __future__ import annotations

import csv
import io
import json
import re

import numpy as np
import pytest

from atlas.cache import read_cache, special_share, write_cache
from atlas.errors import AtlasError
from atlas.render import render_site
from atlas.render.chunks import read_chunk_script
from atlas.render.load import load_cache
from atlas.render.pages import fmt_num, fmt_pct
from synthetic_cache import make_synthetic_cache, write_synthetic_cache
from web import base_url, serve_folder

N_FEATURES = 30
CORPORA = ("web", "chat")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    cache_dir = write_synthetic_cache(root / "cache", n_features=N_FEATURES, vocab_size=300, n_sequences=21,
                                      seq_len=40, seed=4, corpora=CORPORA)
    site = root / "site"
    render_site(cache_dir, site)
    return {"cache": read_cache(cache_dir), "site": site, "root": root}


def _meta(site) -> dict:
    return json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])


def _facts(html: str) -> dict[str, str]:
    return dict(re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", html))


def _want_density(cache) -> np.ndarray:
    n_tok = np.array([c["n_tokens"] for c in cache.manifest.corpora], dtype=np.float64)
    return cache.features.corpus_n_active / n_tok


def test_synthetic_corpora_are_consistent(world):
    cache = world["cache"]
    fs, m = cache.features, cache.manifest
    assert [c["name"] for c in m.corpora] == list(CORPORA)
    assert cache.corpus_ids.tolist() == [0] * 11 + [1] * 10
    np.testing.assert_array_equal(fs.corpus_n_active.sum(1), fs.n_active)
    assert sum(c["n_tokens"] for c in m.corpora) == m.n_tokens


def test_feature_pages_show_density_and_max_per_corpus_and_the_special_share(world):
    cache = world["cache"]
    fs = cache.features
    dens = _want_density(cache)
    share = special_share(fs.n_active, fs.special_n_active, cache.manifest.settings.exclude_special)
    shown = 0
    for f in range(N_FEATURES):
        facts = _facts((world["site"] / "f" / str(f) / "index.html").read_text("utf-8"))
        for c, name in enumerate(CORPORA):
            assert facts[f"On {name}"] == f"{fmt_pct(dens[f, c])} density · max {fmt_num(fs.corpus_max_act[f, c])}"
        if fs.n_active[f] > 0:
            assert facts["On special tokens"] == f"{fmt_pct(share[f])} of activations"
            shown += 1
        else:
            assert "On special tokens" not in facts  # never active: no share
    assert shown > 0


def test_meta_index_chunk_and_csv_carry_the_columns(world):
    cache = world["cache"]
    fs = cache.features
    meta = _meta(world["site"])
    assert meta["corpora"] == [{"name": c["name"], "n_sequences": c["n_sequences"], "n_tokens": c["n_tokens"]}
                               for c in cache.manifest.corpora]
    assert meta["has_special"] is True
    _, chunk = read_chunk_script((world["site"] / "data" / "index" / "0.js").read_bytes())
    cd = np.frombuffer(chunk["cd"], "<f4").reshape(N_FEATURES, len(CORPORA))
    np.testing.assert_allclose(cd, _want_density(cache).astype(np.float32), rtol=1e-6)
    sp = np.frombuffer(chunk["sp"], "<f4")
    want = special_share(fs.n_active, fs.special_n_active, False).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(sp), np.isnan(want))
    np.testing.assert_allclose(sp[~np.isnan(sp)], want[~np.isnan(want)], rtol=1e-6)
    rows = list(csv.DictReader(io.StringIO((world["site"] / "features.csv").read_text("utf-8"))))
    assert float(rows[3]["density_chat"]) == pytest.approx(_want_density(cache)[3, 1], rel=1e-5)
    assert float(rows[3]["max_act_web"]) == pytest.approx(float(fs.corpus_max_act[3, 0]), rel=1e-5)
    assert float(rows[3]["special_share"]) == pytest.approx(float(want[3]), rel=1e-5)
    index = (world["site"] / "index.html").read_text("utf-8")
    assert 'data-key="cd0"' in index and 'data-key="cd1"' in index and 'data-key="special"' in index
    assert '<option value="chat">chat</option>' in index
    n_web, n_chat = (c["n_tokens"] for c in cache.manifest.corpora)
    assert f'(<span class="corpus">web</span> {n_web:,}, <span class="corpus">chat</span> {n_chat:,})' in index


def test_a_cache_without_corpora_shows_none_of_it(tmp_path):
    cache_dir = write_synthetic_cache(tmp_path / "cache", n_features=5, vocab_size=120, n_sequences=8, seq_len=40)
    render_site(cache_dir, tmp_path / "site")
    meta = _meta(tmp_path / "site")
    assert "corpora" not in meta and "has_special" not in meta
    _, chunk = read_chunk_script((tmp_path / "site" / "data" / "index" / "0.js").read_bytes())
    assert "cd" not in chunk and "sp" not in chunk
    facts = _facts((tmp_path / "site" / "f" / "0" / "index.html").read_text("utf-8"))
    assert not [k for k in facts if k.startswith("On ")]
    assert "special_share" not in (tmp_path / "site" / "features.csv").read_text("utf-8").splitlines()[0]


def test_corpus_columns_that_disagree_with_the_manifest_are_refused(tmp_path):
    cache = make_synthetic_cache(n_features=5, vocab_size=120, n_sequences=8, seq_len=40, corpora=CORPORA)
    cache.manifest.corpora = cache.manifest.corpora[:1]
    write_cache(tmp_path / "cache", cache)
    with pytest.raises(AtlasError, match="corpus_n_active has shape"):
        load_cache(tmp_path / "cache")


@pytest.mark.browser
def test_index_sorts_and_filters_by_corpus_density_and_special_share(world, browser):
    cache = world["cache"]
    fs = cache.features
    dens = _want_density(cache).astype(np.float32)
    share = special_share(fs.n_active, fs.special_n_active, False).astype(np.float32)
    server = serve_folder(world["site"])
    context = browser.new_context(viewport={"width": 1400, "height": 2400})
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        def ids() -> list[int]:
            page.wait_for_timeout(50)
            return [int(x) for x in page.locator("#rows tr:not(.spacer) td:first-child a").all_inner_texts()]

        page.goto(base_url(server, "index.html"))
        page.wait_for_selector("html[data-ready]", timeout=10_000)
        heads = page.locator("#table thead th").all_inner_texts()
        assert heads[-3:] == ["web", "chat", "Special"]
        row0 = page.locator("#rows tr:not(.spacer)").first.locator("td").all_inner_texts()
        assert row0[-3:] == [fmt_pct(dens[0, 0]), fmt_pct(dens[0, 1]), fmt_pct(share[0])]

        page.click("th[data-key=cd1] button")  # descending first
        assert ids()[0] == int(np.argmax(dens[:, 1]))

        page.select_option("#f-corpus", "chat")
        page.fill("#f-cmin", "0.01")
        page.locator("#f-cmin").dispatch_event("change")
        assert sorted(ids()) == np.flatnonzero(dens[:, 1] >= np.float32(0.01)).tolist()
        assert "cdens=chat%3A0.01-1" in page.url

        page.click("#f-reset")
        page.fill("#f-smax", "20%")
        page.locator("#f-smax").dispatch_event("change")
        want = np.flatnonzero(share <= np.float32(0.2)).tolist()
        assert 0 < len(want) < N_FEATURES and sorted(ids()) == want
        assert "smax=0.2" in page.url

        page.goto(base_url(server, "f/0/index.html"))  # the page's rows, with a clean console
        page.wait_for_selector("html[data-ready]", timeout=10_000)
        facts = dict(zip(page.locator("dl.facts dt").all_inner_texts(), page.locator("dl.facts dd").all_inner_texts()))
        assert facts["On chat"] == f"{fmt_pct(dens[0, 1])} density · max {fmt_num(fs.corpus_max_act[0, 1])}"
        assert facts["On special tokens"] == f"{fmt_pct(share[0])} of activations"

        page.goto(base_url(server, "index.html#cdens=web:0-0.001"))  # state from a shared link
        page.wait_for_selector("html[data-ready]", timeout=10_000)
        assert page.locator("#f-corpus").input_value() == "web"
        assert sorted(ids()) == np.flatnonzero(dens[:, 0] <= np.float32(0.001)).tolist()
        page.goto("about:blank")
        page.goto(base_url(server, "index.html#cdens=chat:1e-3-1"))  # an exponent in the range
        page.wait_for_selector("html[data-ready]", timeout=10_000)
        want = np.flatnonzero(dens[:, 1] >= np.float32(1e-3)).tolist()
        assert 0 < len(want) and sorted(ids()) == want
        assert problems == []
    finally:
        context.close()
        server.shutdown()
