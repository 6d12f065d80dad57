"""`atlas build` end to end on the tiny fixture models, checked against a brute-force computation and
opened in headless Chromium over HTTP and from file://.

The brute force takes a different path from the product on purpose: plain transformers
``output_hidden_states`` (no NNsight), the checkpoint's raw state dict (no ``atlas.checkpoints``), and
dense numpy over every token at once.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from web import base_url, serve_folder

from atlas.cache import read_cache
from atlas.cli import main

SEQ_LEN = 48
N_SEQ = 24


@pytest.fixture(scope="module")
def built(tiny_world, tmp_path_factory):
    """Build the two-model fixture crosscoder's atlas once; return (site, cache, scales)."""
    out = tmp_path_factory.mktemp("e2e")
    scales = _estimated_scales(tiny_world)
    site = out / "site"
    args = [
        "build", str(tiny_world.crosscoder_ckpt),
        "--model", str(tiny_world.llama_dir), "--model", str(tiny_world.llama_chat_dir),
        "--dataset", str(tiny_world.corpus_jsonl),
        "-o", str(site), "-n", "0", "-s", str(N_SEQ), "--seq-len", str(SEQ_LEN), "--batch-size", "5",
        "--device", "cpu", "--dtype", "float32",
    ]
    for s in scales:
        args += ["--scale", repr(float(s))]
    assert main(args) == 0
    cache = read_cache(out / "site.atlas-data")
    return site, cache, scales


def _hidden(model_dir: Path, input_ids: torch.Tensor, layer: int) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    with torch.inference_mode():
        out = model(input_ids=input_ids, output_hidden_states=True)
    # hidden_states[0] is the embedding output; hidden_states[L + 1] is the output of block L.
    return out.hidden_states[layer + 1].float()


def _corpus_tokens(tiny_world) -> torch.Tensor:
    from transformers import AutoTokenizer

    from atlas.corpus import load_corpus

    tok = AutoTokenizer.from_pretrained(tiny_world.llama_dir)
    return load_corpus(str(tiny_world.corpus_jsonl), tok, n_sequences=N_SEQ, seq_len=SEQ_LEN)


def _estimated_scales(tiny_world) -> list[float]:
    ids = _corpus_tokens(tiny_world)
    scales = []
    for d in (tiny_world.llama_dir, tiny_world.llama_chat_dir):
        x = _hidden(d, ids, 1)[:, 1:]
        scales.append(math.sqrt(x.shape[-1]) / x.norm(dim=-1).mean().item())
    return scales


def _brute_force(tiny_world, scales):
    """Dense feature activations f[N, T, F] over the same tokens, and the logit effects [F, S, V]."""
    from transformers import AutoModelForCausalLM

    ids = _corpus_tokens(tiny_world)
    sd = torch.load(tiny_world.crosscoder_ckpt, weights_only=True)
    x = torch.stack([_hidden(d, ids, 1) for d in (tiny_world.llama_dir, tiny_world.llama_chat_dir)], dim=2)
    x = x * torch.tensor(scales)[None, None, :, None]
    pre = torch.einsum("ntsd,sdf->ntf", x, sd["W_enc"].float()) + sd["b_enc"].float()
    f = torch.relu(pre).numpy()
    effects = []
    for s, d in enumerate((tiny_world.llama_dir, tiny_world.llama_chat_dir)):
        model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32)
        unembed = model.model.norm.weight.detach()[:, None] * model.lm_head.weight.detach().T  # [d, V]
        effects.append((sd["W_dec"][:, s].float() @ unembed).numpy())
    return ids.numpy(), f, np.stack(effects, axis=1)


def test_statistics_match_brute_force(built, tiny_world):
    site, cache, scales = built
    ids, f, effects = _brute_force(tiny_world, scales)
    np.testing.assert_array_equal(cache.tokens, ids)

    counted = np.ones(ids.shape, dtype=bool)
    counted[:, 0] = False  # every sequence starts with BOS, excluded from statistics
    assert (ids[:, 0] == 0).all()
    fc = f[counted]  # [tokens, F]
    F = f.shape[-1]
    assert cache.manifest.n_features == F
    assert cache.manifest.n_tokens == fc.shape[0]

    feats = cache.features
    np.testing.assert_allclose(feats.density, (fc > 0).mean(0), atol=1e-6)
    np.testing.assert_allclose(feats.max_act, fc.max(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(feats.n_active, (fc > 0).sum(0))
    assert feats.density[0] == 0  # the factory's dead feature

    # Top examples: one per sequence, the sequence's max token, highest first.
    ex = cache.examples
    fm = np.where(counted[:, :, None], f, 0)  # BOS masked
    seq_max = fm.max(1)  # [N, F]
    for j in range(F):
        k = int((ex.top_seq[j] >= 0).sum())
        expected_k = min(int((seq_max[:, j] > 0).sum()), ex.top_seq.shape[1])
        assert k == expected_k, j
        if k == 0:
            continue
        got = ex.top_act[j, :k]
        want = np.sort(seq_max[:, j])[::-1][:k]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        for slot in range(k):
            seq, pos = ex.top_seq[j, slot], ex.top_pos[j, slot]
            np.testing.assert_allclose(fm[seq, pos, j], got[slot], rtol=1e-4, atol=1e-5)
            assert math.isclose(seq_max[seq, j], got[slot], rel_tol=1e-4, abs_tol=1e-5)

    # Logit effects: top and bottom tokens of W_dec[f, s] through each model's own unembedding.
    L = cache.logits.top_ids.shape[-1]
    for j in range(F):
        for s in range(2):
            raw = effects[j, s]
            e = raw - raw.mean()  # centred over the vocabulary
            np.testing.assert_allclose(cache.logits.mean[j, s], raw.mean(), rtol=1e-3, atol=1e-5)
            top = np.sort(e)[::-1][:L]
            bot = np.sort(e)[:L]
            np.testing.assert_allclose(cache.logits.top_vals[j, s], top, rtol=1e-3, atol=1e-5)
            np.testing.assert_allclose(cache.logits.bot_vals[j, s], bot, rtol=1e-3, atol=1e-5)
            np.testing.assert_allclose(e[cache.logits.top_ids[j, s]], top, rtol=1e-3, atol=1e-5)


def _best_feature(cache) -> int:
    return int(np.argmax(cache.features.max_act))


@pytest.fixture(scope="module")
def http_root(built):
    site, _, _ = built
    server = serve_folder(site.parent)
    yield base_url(server, f"{site.name}/")
    server.shutdown()


def _open(browser, url):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto(url)
    page.wait_for_load_state("load")
    return page, problems


@pytest.mark.browser
@pytest.mark.parametrize("transport", ["http", "file"])
def test_feature_page_shows_top_example_with_highlighted_max_token(built, http_root, browser, transport):
    site, cache, _ = built
    fid = _best_feature(cache)
    base = http_root if transport == "http" else site.resolve().as_uri() + "/"
    page, problems = _open(browser, f"{base}f/{fid}/index.html")
    ex = cache.examples
    seq, pos = int(ex.top_seq[fid, 0]), int(ex.top_pos[fid, 0])

    first = page.locator("[data-panel=top] .ex").first
    first.wait_for(timeout=10_000)
    marked = first.locator(".tok.max")
    assert marked.count() == 1
    # The highlighted token is the max-activating token of the top example, and the example shows the
    # sequence's tokens around it, in order (token strings through the page's own vocab reader).
    shown = first.locator(".tok").evaluate_all("els => els.map(e => Atlas.tok(Number(e.dataset.t)))")
    lo = max(0, pos - cache.manifest.settings.window_before)
    hi = min(cache.tokens.shape[1], pos + cache.manifest.settings.window_after + 1)
    assert shown == [cache.vocab[int(t)] for t in cache.tokens[seq, lo:hi]]
    assert marked.evaluate("e => Atlas.tok(Number(e.dataset.t))") == cache.vocab[int(cache.tokens[seq, pos])]
    # Examples come highest first, as many as the cache holds.
    assert page.locator("[data-panel=top] .ex").count() == int((ex.top_seq[fid] >= 0).sum())
    assert page.title() and str(fid) in page.title()
    page.close()
    assert problems == []


@pytest.mark.browser
@pytest.mark.parametrize("transport", ["http", "file"])
def test_index_lists_every_feature(built, http_root, browser, transport):
    site, cache, _ = built
    base = http_root if transport == "http" else site.resolve().as_uri() + "/"
    page, problems = _open(browser, f"{base}index.html")
    n = cache.manifest.n_features
    page.locator("#count").wait_for(timeout=10_000)
    page.wait_for_function(f"() => document.querySelector('#count').textContent.startsWith('{n} of {n}')")
    # The table is virtualised: the first rows are in the DOM, linking to their feature pages.
    first_link = page.locator("#rows tr:not(.spacer) td:first-child a").first
    assert first_link.inner_text() == "0"
    assert first_link.get_attribute("href") == "f/0/index.html"  # explicit file name: works from file://
    page.close()
    assert problems == []
