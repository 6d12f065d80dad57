"""Hostile text end to end: a corpus of HTML/JS payloads, bidirectional, zero-width and control characters,
and characters that byte-level BPE splits into tokens that are not valid UTF-8 on their own, through
`atlas build` on the tiny models, then opened in Chromium.

The payloads must show as text: no script of theirs runs (a global flag stays unset, no dialog opens), no
element or attribute comes from them, the console stays clean, and every invisible or control character
of a token is shown as a visible marker. Tokens holding part of a character's UTF-8 bytes show those bytes
as ``\\xNN`` instead of U+FFFD.
"""

from __future__ import annotations

import json
import signal
import unicodedata
from pathlib import Path

import pytest
import torch

from atlas.cache import read_cache
from atlas.cli import main

torch.set_num_threads(1)

FLAG = "__atlas_pwned"
PAYLOADS = [
    f"<script>window.{FLAG}=1;alert(1)</script>",
    f'<img src=x onerror="window.{FLAG}=2;alert(2)">',
    f'<a href="javascript:window.{FLAG}=3">click me</a> javascript:alert(document.domain)',
    f'"><svg/onload=window.{FLAG}=4>',
    f"</textarea></script><iframe srcdoc=\"<script>parent.{FLAG}=5</script>\"></iframe>",
    "{{7*7}} ${7*7} <%= 7*7 %> &lt;b&gt; &amp;",
    "\u202eevil.exe\u202c \u200fשלום עולם\u200e مرحبا \u2066isolate\u2069",
    "zero\u200bwidth\u200cjoin\u200dbom\ufeffword\u2060joiner",
    "bell\x07 escape\x1b[31mred\x1b[0m backspace\x08 delete\x7f tab\tcr\r nul\x00 end",
    "emoji 🙂🎉 family 👩\u200d👩\u200d👧 accent e\u0301 zalgo Z\u0324\u0354\u0367\u0311\u0313 日本語",
]
TITLE = f"<script>window.{FLAG}=6</script> Hostile & atlas"
CORPUS_NAME = f"<img src=x onerror=window.{FLAG}=7>.jsonl"
# characters that must never reach a token's text as themselves
INVISIBLE = {"Cc", "Cf", "Zl", "Zp"}


N_HTML = 6  # PAYLOADS[:N_HTML] are markup; the rest are characters


def _documents() -> list[str]:
    words = "the feature fires on tokens in a sentence about code and text".split()
    docs = []
    for i in range(48):
        parts = [" ".join(words[(i + j) % len(words):]) + " " + payload for j, payload in enumerate(PAYLOADS)]
        docs.append(" ".join(parts[i % len(PAYLOADS):] + parts[: i % len(PAYLOADS)]))
    return docs


def _hostile_world(root: Path) -> tuple[Path, Path]:
    """A byte-level BPE tokenizer that learned the markup payloads as whole tokens (no pre-tokenizer split
    at punctuation, as SentencePiece vocabularies also do), a tiny GPT-2 with it, and an SAE on that model
    (the factory's calibration); returns (checkpoint, corpus)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import factory

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [topics[k] for k in sorted(topics)[:12]] + PAYLOADS[:N_HTML] * 300  # emoji, bidi, ... stay split
    bpe.train_from_iterator(text, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<bos>", eos_token="<eos>")
    model = factory.build_gpt2(root / "gpt2", tokenizer)

    corpus = root / CORPUS_NAME
    docs = _documents()
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), "utf-8")
    ids = [i for d in docs for i in tokenizer(d, add_special_tokens=False)["input_ids"]]
    calib = torch.tensor([[tokenizer.bos_token_id] + ids[k * 63:(k + 1) * 63] for k in range(16)])
    x = factory.resid_post(model, calib, 1)[:, 1:].reshape(-1, factory.D_MODEL)
    weights = factory._crosscoder_weights(factory._scaled(x)[:, None], 32, seed=5)
    ckpt = factory._save_ckkissane(root / "sae" / "sae.pt", weights, factory._cfg(str(root / "gpt2"), 32, 64))
    return ckpt, corpus


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    ckpt, corpus = _hostile_world(root)
    site = root / "site"
    old = signal.getsignal(signal.SIGTERM)
    try:
        code = main(["build", str(ckpt), "--dataset", str(corpus), "--title", TITLE, "-o", str(site), "-n", "0",
                     "-s", "24", "--seq-len", "48", "--batch-size", "8", "--device", "cpu"])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 0
    from transformers import AutoTokenizer

    return site, read_cache(root / "site.atlas-data"), AutoTokenizer.from_pretrained(root / "gpt2")


def _tokenizer(tiny_world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_world.tokenizer_dir)


def test_tokens_split_inside_a_character_show_their_bytes(hostile):
    _, cache, tok = hostile
    for payload in PAYLOADS[:N_HTML]:  # the markup is whole tokens: the worst case for the page
        assert payload in cache.vocab
    for text, shown in (("🙂", r"\xf0\x9f\x99\x82"), ("é", r"\xc3\xa9"), ("\u202e", r"\xe2\x80\xae")):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) > 1, f"{text!r} is one token in this vocabulary: pick another character"
        assert "".join(cache.vocab[i] for i in ids) == shown
    broken = [i for i, s in enumerate(cache.vocab) if "\ufffd" in s]
    assert not broken, f"tokens still shown as U+FFFD: {broken[:10]}"
    # tokens that are text on their own are unchanged (leading spaces kept)
    for i in tok(" the feature\tfires", add_special_tokens=False)["input_ids"]:
        assert cache.vocab[i] == tok.decode([i])


def test_vocab_bytes_of_every_token_round_trip(tiny_world):
    """The display string of each token decodes back to its bytes: \\xNN only for bytes that are not UTF-8."""
    from atlas.models import token_bytes, token_display

    tok = _tokenizer(tiny_world)
    for i in range(len(tok)):
        raw = token_bytes(tok, i)
        shown = token_display(tok, i)
        if raw is None:  # special tokens
            assert shown == tok.decode([i])
            continue
        assert shown == raw.decode("utf-8", "backslashreplace")
        assert ("\ufffd" in shown) == ("\ufffd".encode() in raw)


# --------------------------------------------------------------------------- in the browser


NEEDLES = ("atlas_pwned", "\\x", "\x07")  # a payload, bytes of a split character, a control character


def _payload_features(cache) -> list[int]:
    """For each needle, the feature whose top examples show it most often."""
    ex, T = cache.examples, cache.tokens.shape[1]
    wb, wa = cache.manifest.settings.window_before, cache.manifest.settings.window_after
    texts = []
    for f in range(cache.manifest.n_features):
        text = ""
        for seq, pos in zip(ex.top_seq[f], ex.top_pos[f]):
            if seq >= 0:
                text += "".join(cache.vocab[int(i)] for i in cache.tokens[seq, max(0, pos - wb): min(T, pos + wa + 1)])
        texts.append(text)
    chosen = []
    for needle in NEEDLES:
        counts = [t.count(needle) for t in texts]
        assert max(counts) > 0, f"no top example shows {needle!r}: the corpus does not reach the pages"
        if counts.index(max(counts)) not in chosen:
            chosen.append(counts.index(max(counts)))
    return chosen


CHECK_DOM = """() => {
  const bad = [];
  for (const e of document.querySelectorAll('*')) {
    for (const a of e.attributes) {
      if (a.name.startsWith('on')) bad.push(e.tagName + ' has ' + a.name);
      if ((a.name === 'href' || a.name === 'src') && /^\\s*javascript:/i.test(a.value)) bad.push(e.tagName + ' ' + a.value);
    }
  }
  for (const e of document.querySelectorAll('iframe, object, embed, img, image, foreignObject')) bad.push('element ' + e.tagName);
  for (const s of document.scripts) {
    const src = s.getAttribute('src') || '';
    if (s.type === 'application/x-atlas') continue;
    if (src && !/^(\\.\\.\\/)*(assets|data)\\//.test(src)) bad.push('script ' + src);
    if (!src && /atlas_pwned/.test(s.textContent)) bad.push('inline script from the data');
  }
  return bad;
}"""

TOKEN_TEXTS = """() => Array.from(document.querySelectorAll('.tok, .chip, td, .rtext, h1, title, .label, dd'))
  .map(e => e.textContent)"""


def _open(browser, url, ready=True):
    page = browser.new_page()
    problems, dialogs = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(url)
    if ready:
        page.wait_for_selector("html[data-ready]", timeout=15_000)
    else:
        page.wait_for_load_state("load")
    return page, problems, dialogs


def _check(page, problems, dialogs):
    page.wait_for_timeout(100)  # let late handlers (onerror of a broken image) run
    assert page.evaluate(f"typeof window.{FLAG}") == "undefined"
    assert dialogs == []
    assert page.evaluate(CHECK_DOM) == []
    for text in page.evaluate(TOKEN_TEXTS):
        hidden = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) in INVISIBLE and c not in " "})
        assert not hidden, f"invisible characters shown raw in {text!r}: {hidden}"
    assert problems == []


@pytest.mark.browser
def test_payloads_render_as_text(hostile, browser):
    site, cache, _ = hostile
    base = site.resolve().as_uri() + "/"  # file://: the same pages and scripts as over HTTP
    features = _payload_features(cache)
    shown = ""
    for fid in features:
        page, problems, dialogs = _open(browser, f"{base}f/{fid}/index.html")
        assert TITLE in page.title()  # the title as text, in the tab
        page.locator("[data-panel=top] .ex").first.wait_for(timeout=10_000)
        shown += page.locator("main").inner_text()
        page.locator(".tok").first.hover()
        _check(page, problems, dialogs)
        page.close()
    for payload in PAYLOADS[:3]:
        assert payload in shown or payload.split(" javascript:")[0] in shown
    assert "\\xf0\\x9f" in shown or "\\xe2\\x80" in shown  # bytes of split characters, as \xNN
    assert "\u2407" in shown  # the bell character, as its visible symbol

    page, problems, dialogs = _open(browser, f"{base}index.html")
    assert TITLE in page.inner_text("header")
    assert CORPUS_NAME in page.inner_text("footer")  # the corpus's file name, as text
    page.fill("#q", "script")
    page.wait_for_selector("#search-results:not([hidden])", timeout=10_000)
    _check(page, problems, dialogs)
    page.fill("#q", "<img")
    page.wait_for_timeout(400)
    _check(page, problems, dialogs)
    page.close()

