"""A published site with a damaged data file (a broken upload, a partial copy): the pages that need the file
say so in a visible message that names it, and the other pages keep working with a clean console."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from synthetic_cache import write_synthetic_cache

from atlas.render import render_site

pytestmark = pytest.mark.browser
DAMAGED = "is damaged or truncated"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damaged")
    cache = write_synthetic_cache(root / "cache", n_features=12, n_sources=2, vocab_size=300, n_sequences=24,
                                  seq_len=48, seed=5)
    render_site(cache, root / "site")
    return root / "site"


def _damaged_copy(site: Path, tmp_path: Path, rel: str, damage) -> Path:
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    path = copy / rel
    path.write_bytes(damage(path.read_bytes()))
    return copy


def _truncate(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _garble(data: bytes) -> bytes:
    """Other base64 characters in the middle of the payload: still a valid script, not a valid payload."""
    head, _, rest = data.partition(b'","')
    body, _, tail = rest.rpartition(b'");')
    mid = len(body) // 2
    return head + b'","' + body[:mid] + b"AAAAAAAAAAAAAAAAAAAAAAAA" + body[mid + 24:] + b'");' + tail


def _not_base64(data: bytes) -> bytes:
    head, _, _ = data.partition(b'","')
    return head + b'","%%% not base64 %%%");\n'


def _open(browser, url, ready: bool = True):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    if ready:
        page.wait_for_selector("html[data-ready]", timeout=10_000)
    return page, problems


@pytest.mark.parametrize("damage", [_truncate, _garble, _not_base64], ids=["truncated", "garbled", "not-base64"])
def test_damaged_vocab_shard(site, browser, tmp_path, damage):
    copy = _damaged_copy(site, tmp_path, "data/vocab/0.js", damage)
    base = copy.resolve().as_uri() + "/"
    page, _ = _open(browser, f"{base}f/0/index.html", ready=False)
    error = page.locator("#panels .error")
    error.wait_for(timeout=10_000)
    text = error.inner_text()
    assert "data/vocab/0.js" in text and DAMAGED in text and "upload it again" in text
    assert page.locator("h1").inner_text().startswith("Feature 0")  # the static facts are still there
    page.close()

    page, problems = _open(browser, f"{base}index.html")  # the table does not need the vocabulary
    assert page.locator("#rows tr:not(.spacer)").count() > 0
    page.close()
    assert problems == []


def test_damaged_index_chunk(site, browser, tmp_path):
    copy = _damaged_copy(site, tmp_path, "data/index/0.js", _garble)
    base = copy.resolve().as_uri() + "/"
    page, _ = _open(browser, f"{base}index.html", ready=False)
    page.wait_for_function("() => /damaged/.test(document.querySelector('#count').textContent)", timeout=10_000)
    text = page.locator("#count").inner_text()
    assert "data/index/0.js" in text and DAMAGED in text
    page.close()

    for url in (f"{base}f/0/index.html", f"{base}f/11/index.html"):  # feature pages do not need the table
        page, problems = _open(browser, url)
        page.close()
        assert problems == []


def test_damaged_search_shards(site, browser, tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    shards = sorted((copy / "data" / "search").glob("t*.js"))
    assert shards
    for path in shards:
        path.write_bytes(_truncate(path.read_bytes()))
    page, _ = _open(browser, copy.resolve().as_uri() + "/index.html")
    page.fill("#q", "the")
    box = page.locator("#search-results")
    page.wait_for_function("() => /damaged/.test(document.querySelector('#search-results').textContent)",
                           timeout=10_000)
    assert "data/search/t" in box.inner_text() and DAMAGED in box.inner_text()
    assert page.locator("#rows tr:not(.spacer)").count() > 0  # the table still works
    page.close()
