"""The browser's reader (assets/atlas.js) decodes what the Python writer writes: a Node unit test.

Python writes a sample data script, renders a tiny site, and records what it expects in
``expected.json``; ``node --test tests/js/`` decodes them with the same atlas.js the site ships.
Skipped only when ``node`` is not installed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from atlas.render import render_site
from atlas.render.chunks import chunk_script, decode_payload, pack, read_chunk_script
from atlas.render.pages import fmt_num
from atlas.render.search import fnv1a32, label_words, shard_of, token_key
from atlas.render.text import chip, visible
from synthetic_cache import write_synthetic_cache

HERE = Path(__file__).parent
NODE = shutil.which("node")

TRICKY_TOKENS = [" The", "the", "THE", "\n", "\n\n", " \t x", "\u00c9t\u00e9", " \u6771\u4eac", " \U0001f642ok",
                 "\u0130stanbul", "\u03a3\u039f\u03a3", "<script>", "\x00a", "  ", "x\u200by", "\ufeffbom\u00ad"]
LABELS = ["Negation in legal text", "numbers 123 and 4.5", "caf\u00e9 \u00e9t\u00e9", "snake_case words",
          "\u6771\u4eac tokyo", "<img src=x onerror=alert(1)>"]


def _jsonable(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def _jsonable_list(arr: np.ndarray) -> list:
    return [_jsonable(float(x)) if arr.dtype.kind == "f" else int(x) for x in arr]


def _write_fixture(folder: Path) -> None:
    bins = {
        "u1": (np.array([0, 1, 127, 255]), "u1"),
        "u2": (np.array([0, 1, 300, 65535]), "u2"),
        "u4": (np.array([0, 70000, 2**32 - 1]), "u4"),
        "f2": (np.array([0.0, 1.5, -2.25, 0.0001, 65504.0]), "f2"),
        "f4": (np.array([3.14159, -1e-20, 1e20, np.nan]), "f4"),
        "i1": (np.array([-1, 0, 1, 2, -128, 127]), "i1"),
    }
    sample = {
        "int": 123456, "neg": -7, "float": 0.25, "none": None,
        "strings": ["plain", " leading", "new\nline", "\u00e9\U0001f642", "<script>alert(1)</script>", ""],
        "nested": [[1, [2, "x"]], {"k": 3}],
    }
    obj = dict(sample)
    for key, (arr, kind) in bins.items():
        obj[key] = pack(arr, kind)
    (folder / "sample.js").write_bytes(chunk_script("sample", obj))

    cache = write_synthetic_cache(folder / "cache", n_features=5, vocab_size=300, n_sequences=12, seq_len=40,
                                  hostile_text=True, next_token_effects="all")
    site = folder / "site"
    render_site(cache, site)
    html = (site / "f" / "0" / "index.html").read_text("utf-8")
    (folder / "feature.html").write_text(html, "utf-8")
    b64 = html.split('id="atlas-feature">', 1)[1].split("</script>", 1)[0]
    p = decode_payload(b64)
    meta = json.loads((site / "data" / "meta.js").read_text("ascii")[len("Atlas.meta("):-3])
    kind = "<u2" if meta["vocab"]["id_bytes"] == 2 else "<u4"
    shutil.copy(site / "data" / "vocab" / "0.js", folder / "vocab0.js")
    shutil.copy(site / "data" / "index" / "0.js", folder / "index0.js")
    shutil.copy(site / "data" / "vocab" / "ids0.js", folder / "ids0.js")
    _, vocab0 = read_chunk_script((site / "data" / "vocab" / "0.js").read_bytes())
    _, ids0 = read_chunk_script((site / "data" / "vocab" / "ids0.js").read_bytes())

    # named corpora and special-token shares: the index chunk's cd / sp columns
    corpora_cache = write_synthetic_cache(folder / "cache-corpora", n_features=6, vocab_size=120, n_sequences=9,
                                          seq_len=40, corpora=("web", "chat", "code"))
    render_site(corpora_cache, folder / "site-corpora")
    shutil.copy(folder / "site-corpora" / "data" / "index" / "0.js", folder / "index_corpora0.js")
    _, corpora_chunk = read_chunk_script((folder / "site-corpora" / "data" / "index" / "0.js").read_bytes())

    expected = {
        "sample": {**sample, "bins_kind": {k: v[1] for k, v in bins.items()},
                   "bins": {k: [_jsonable(float(x)) for x in np.asarray(v[0], dtype=float)] for k, v in bins.items()}},
        "feature": {
            "id": p["id"], "max": p["max"], "id_bytes": meta["vocab"]["id_bytes"],
            "tt": np.frombuffer(p["tt"], kind).tolist(), "ta": list(p["ta"]), "ig": list(p["ig"]),
            "vs": p["vs"], "h": p["h"], "iv": np.frombuffer(p["iv"], "<f2").astype(float).tolist(),
            "dc": p["dc"], "n_sources": 2,
            # the optional statistics: key -> [reader, values]
            "optional": {key: [kind, _jsonable_list(np.frombuffer(p[key], dt))] for key, kind, dt in (
                ("xs", "u2", "<u2"), ("xd", "u4", "<u4"), ("xv", "f2", "<f2"), ("fi", "u4", "<u4"),
                ("fv", "f2", "<f2"), ("as", "u2", "<u2"), ("ad", "u4", "<u4"), ("av", "f4", "<f4"),
                ("af", "f2", "<f2"), ("tn", "f2", "<f2"), ("in", "f2", "<f2"), ("tp", "u4", "<u4"),
                ("ip", "u4", "<u4"))},
            # the B−A table (nested under ld) and the subtracted mean logit effect per source
            "ld": {key: [reader, _jsonable_list(np.frombuffer(p["ld"][key], dt))] for key, reader, dt in (
                ("ti", "ids", kind), ("bi", "ids", kind), ("tv", "f4", "<f4"), ("bv", "f4", "<f4"))},
            "lg_mean": [lg["m"] for lg in p["lg"]], "na": p["na"],
            "n_active_ta": int((np.frombuffer(p["ta"], np.uint8) > 0).sum()),
            "n_active_ia": int((np.frombuffer(p["ia"], np.uint8) > 0).sum()),
        },
        "index_dc": np.frombuffer(read_chunk_script((site / "data" / "index" / "0.js").read_bytes())[1]["dc"],
                                  np.int8).tolist(),
        "index_corpora": {"n_corpora": 3, "cd": _jsonable_list(np.frombuffer(corpora_chunk["cd"], "<f4")),
                          "sp": _jsonable_list(np.frombuffer(corpora_chunk["sp"], "<f4"))},
        "vocab0": {"s": vocab0["s"], "o": np.frombuffer(ids0["o"], "<u4").tolist()},
        "search": {
            "tokens": [{"raw": t, "key": token_key(t)} for t in TRICKY_TOKENS],
            "shards": [{"key": k, "n": n, "hash": fnv1a32(k[:2]), "shard": shard_of(k, n)}
                       for k in [token_key(t) for t in TRICKY_TOKENS if token_key(t)] + ["negation", "zz"]
                       for n in (1, 8, 64)],
            "labels": [{"text": t, "words": label_words(t)} for t in LABELS],
        },
        "fmt": [{"x": x, "digits": d, "text": fmt_num(x, d)}
                for x in (0.0, 1.0, 3.14159, 12345.678, 0.000123456, 1e-7, 2.5e10, -0.5, 99.95, 123.0, 6.19e-5,
                          -1.5e-5, 9.9996e-5, 0.00099996, 999.6, 99999.0, 1e-6, 0.1)
                for d in (3, 4)],
        "visible": [{"raw": t, "visible": visible(t), "chip": chip(t)} for t in TRICKY_TOKENS + [""]],
    }
    (folder / "expected.json").write_text(json.dumps(expected, ensure_ascii=False), "utf-8")


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_js_reader_decodes_python_writer(tmp_path):
    _write_fixture(tmp_path)
    env = dict(os.environ, ATLAS_JS_FIXTURE=str(tmp_path))
    proc = subprocess.run([NODE, "--test", str(HERE / "js")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "# fail 0" in proc.stdout
    assert "# skipped 0" in proc.stdout
