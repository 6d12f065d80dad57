"""Fuzzing the analysis cache reader: random, truncated and corrupted cache files.

``atlas.cache.read_cache`` must return a Cache or raise ``ValueError`` naming the file; ``atlas render`` on
such a cache must either write a site or fail with one ``atlas: error:`` line that names the fix (rerun
``atlas analyze``), never with a traceback. Examples are derandomised, so a run is reproducible.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic_cache import write_synthetic_cache

from atlas.cache import FILES, Cache, read_cache
from atlas.cli import main

NAMES = ("manifest.json",) + tuple(FILES)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@functools.lru_cache(maxsize=1)
def good_files() -> tuple[tuple[str, bytes], ...]:
    """The files of a small valid cache (made once)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_synthetic_cache(Path(tmp) / "cache", n_features=5, n_sources=2, vocab_size=60,
                                       n_sequences=6, seq_len=40, seed=4)
        return tuple(sorted((p.name, p.read_bytes()) for p in folder.iterdir() if p.is_file()))


@st.composite
def byte_damage(draw):
    """(file, damaged bytes or None for a deleted file) applied to a valid cache."""
    name = draw(st.sampled_from(NAMES))

    def apply(data: bytes) -> bytes | None:
        kind = draw(st.sampled_from(["truncate", "flip", "splice", "random", "delete", "empty"]))
        if kind == "truncate":
            return data[: draw(st.integers(0, max(0, len(data) - 1)))]
        if kind == "flip" and data:
            out = bytearray(data)
            for _ in range(draw(st.integers(1, 8))):
                i = draw(st.integers(0, len(out) - 1))
                out[i] ^= draw(st.integers(1, 255))
            return bytes(out)
        if kind == "splice":
            i = draw(st.integers(0, len(data)))
            return data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i + draw(st.integers(0, 64)):]
        if kind == "random":
            return draw(st.binary(max_size=256))
        return None if kind == "delete" else b""

    return name, apply


@st.composite
def json_damage(draw):
    """(file, transform) changing one value (or key) of manifest.json or vocab.json to any JSON value."""
    name = draw(st.sampled_from(["manifest.json", "vocab.json"]))

    def apply(data: bytes) -> bytes:
        obj = json.loads(data)
        node = obj
        while True:  # walk down to a random container
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            child = node[key]
            if isinstance(child, (dict, list)) and child and draw(st.booleans()):
                node = child
                continue
            if isinstance(node, dict) and draw(st.integers(0, 4)) == 0:
                del node[key]
            else:
                node[key] = draw(JSON_VALUES)
            break
        return json.dumps(obj).encode("utf-8")

    return name, apply


@st.composite
def value_damage(draw):
    """(file, transform) writing other numbers of the same type and shape into one array (valid file)."""
    name = draw(st.sampled_from(["tokens.npy", "features.npz", "examples.npz", "logits.npz"]))

    def apply(data: bytes) -> bytes:
        if name.endswith(".npy"):
            arrays = {"": np.load(io.BytesIO(data), allow_pickle=False)}
        else:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        key = draw(st.sampled_from(sorted(arrays)))
        arr = arrays[key].copy()
        if arr.size:
            flat = arr.reshape(-1)
            if arr.dtype.kind == "f":
                values = st.floats(width=32) | st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0, 1e30])
            elif arr.dtype.kind == "b":
                values = st.booleans()
            else:
                info = np.iinfo(arr.dtype)
                values = st.integers(int(info.min), int(info.max)) | st.integers(-3, 70)
            for i in draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=5)):
                flat[i] = draw(values)
        arrays[key] = arr
        buf = io.BytesIO()
        if name.endswith(".npy"):
            np.save(buf, arrays[""])
        else:
            np.savez(buf, **arrays)
        return buf.getvalue()

    return name, apply


DAMAGE = st.lists(st.one_of(byte_damage(), json_damage(), value_damage()), min_size=1, max_size=3)


def damaged_copy(damage, folder: Path) -> None:
    files = dict(good_files())
    for name, apply in damage:
        if name not in files:
            continue
        try:
            new = apply(files[name])
        except Exception:  # noqa: BLE001 - json or value damage after byte damage: the file no longer parses
            continue
        if new is None:
            del files[name]
        else:
            files[name] = new
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damage=DAMAGE)
def test_read_cache_gives_a_cache_or_a_value_error(damage):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"
        damaged_copy(damage, folder)
        try:
            cache = read_cache(folder)
        except ValueError as exc:
            assert str(exc), "a ValueError without a message"
            return
        assert isinstance(cache, Cache)


@pytest.fixture
def _restore_sigterm():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # damaged values > float16 max
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(damage=DAMAGE)
def test_render_reports_a_damaged_cache_as_one_line(damage, capsys, _restore_sigterm):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "cache"
        damaged_copy(damage, folder)
        site = Path(tmp) / "site"
        capsys.readouterr()
        code = main(["render", str(folder), "-o", str(site)])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        if code == 0:
            assert (site / "index.html").is_file()
            return
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("atlas: error:")]
        assert len(lines) == 1, err
        assert "atlas analyze" in lines[0], lines[0]
        assert not site.exists()
        shutil.rmtree(folder)


def test_the_fuzzed_cache_is_valid_to_begin_with(tmp_path):
    damaged_copy([], tmp_path / "cache")
    assert read_cache(tmp_path / "cache").manifest.n_features == 5
    assert main(["render", str(tmp_path / "cache"), "-o", str(tmp_path / "site")]) == 0
