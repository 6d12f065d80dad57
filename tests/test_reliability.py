"""Bad input, failures and interruptions through the command line: every row of docs/errors.md.

Each row: exit status 2, one line ``atlas: error: ...`` holding what the docs quote (the message and the
options of the fix), no traceback, and nothing lost: the previous site and cache byte-identical when the
failure comes before the analysis, the cache resumable (and then equal to an uninterrupted run's) after.
Interrupted runs (SIGINT, SIGTERM, SIGKILL) are real signals sent to ``atlas analyze`` subprocesses.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_merge import assert_same_cache as same_cache

import atlas.cache
from atlas.cache import read_cache, read_manifest
from atlas.cli import main

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
ERRORS_DOC = REPO / "docs" / "errors.md"
RUN = ["-n", "0", "-s", "8", "--seq-len", "32", "--batch-size", "4", "--device", "cpu"]


# --------------------------------------------------------------------------- helpers


def doc_rows() -> dict[str, tuple[list[str], list[str]]]:
    """The table of docs/errors.md: situation → (quoted message fragments, options named in the fix)."""
    rows = {}
    for line in ERRORS_DOC.read_text("utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] == "Situation" or set(cells[0]) <= {"-"}:
            continue
        said = re.findall(r"`([^`]+)`", cells[1])
        options = [s for s in re.findall(r"`([^`]+)`", cells[2]) if s.startswith("-")]
        rows[cells[0]] = (said, options)
    return rows


ROWS = doc_rows()


def expect(message: str, row: str) -> None:
    """``message`` says what the docs' row ``row`` quotes, and names the options of its fix."""
    said, options = ROWS[row]
    assert said, f"the row {row!r} of docs/errors.md quotes no message"
    for fragment in said + options:
        assert fragment in message, f"{row}: {fragment!r} is not in the message {message!r}"


def failing(capsys, *argv: str) -> str:
    """Run ``atlas ARGV``; check it fails with exit 2 and one error line (the last); return its message."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("atlas: error:")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0]
    return errors[0][len("atlas: error: "):]


def files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too) → its bytes; empty folders as ``name/`` → b""."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if not dirnames and not filenames and rel != Path("."):
            out[rel.as_posix() + "/"] = b""
        for name in filenames:
            out[(rel / name).as_posix()] = (Path(dirpath) / name).read_bytes()
    return out


def assert_same_cache(a: Path, b: Path) -> None:
    """The caches in folders ``a`` and ``b`` hold the same analysis, bit for bit (all but the creation time)."""
    same_cache(read_cache(a), read_cache(b), bitwise=True)


class _Filling:
    """A file on a disk that fills up: the first write stores half its bytes, then ENOSPC."""

    def __init__(self, fh):
        self._fh = fh

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def write(self, data):
        self._fh.write(data[: len(data) // 2])
        self._fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._fh, name)


class _OsWithFullDisk:
    """Stands in for ``os`` inside :mod:`atlas.cache`: the disk is full from the ``after + 1``-th file on."""

    def __init__(self, after: int):
        self.after = after
        self.opened = 0

    def __getattr__(self, name):
        return getattr(os, name)

    def fdopen(self, fd, *args, **kwargs):
        fh = os.fdopen(fd, *args, **kwargs)
        self.opened += 1
        return fh if self.opened <= self.after else _Filling(fh)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def previous(tiny_world, tmp_path_factory) -> Path:
    """A folder holding a site built from the fixture SAE (``site/``) and its cache (``site.atlas-data/``)."""
    root = tmp_path_factory.mktemp("previous")
    code = main(["build", str(tiny_world.sae_ckpt), "--dataset", str(tiny_world.corpus_jsonl),
                 "-o", str(root / "site"), *RUN])
    assert code == 0
    return root


class Out:
    """A copy of the previous site and cache, with a snapshot of their bytes."""

    def __init__(self, root: Path):
        self.root = root
        self.site = root / "site"
        self.cache = root / "site.atlas-data"
        self.before = files(root)

    def intact(self) -> bool:
        return files(self.root) == self.before


@pytest.fixture
def out(previous, tmp_path) -> Out:
    shutil.copytree(previous, tmp_path / "out")
    return Out(tmp_path / "out")


@pytest.fixture
def sae(tiny_world, tmp_path) -> Path:
    """A copy of the fixture SAE checkpoint (``sae.pt`` + ``sae_cfg.json``) to damage."""
    shutil.copytree(tiny_world.sae_ckpt.parent, tmp_path / "sae")
    return tmp_path / "sae" / "sae.pt"


@pytest.fixture(autouse=True)
def _restore_sigterm():
    """main() installs a SIGTERM handler; put pytest's back after each test."""
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def build_argv(world, ckpt, site, *extra):
    return ["build", ckpt, "--dataset", world.corpus_jsonl, "-o", site, *RUN, *extra]


def test_every_row_of_the_table_is_tested():
    assert len(ROWS) >= 15
    source = Path(__file__).read_text("utf-8")
    untested = [row for row in ROWS if f'"{row}")' not in source]
    assert not untested, f"rows of docs/errors.md without a test: {untested}"


# --------------------------------------------------------------------------- checkpoints and models


def test_checkpoint_without_cfg(capsys, out, sae, tiny_world):
    (sae.parent / "sae_cfg.json").unlink()
    msg = failing(capsys, *build_argv(tiny_world, sae, out.site))
    expect(msg, "Checkpoint without its cfg")
    assert "sae_cfg.json" in msg
    assert out.intact()


def test_invalid_cfg(capsys, out, sae, tiny_world):
    (sae.parent / "sae_cfg.json").write_text('{"d_in": 32, "dict_size": ', "utf-8")
    msg = failing(capsys, *build_argv(tiny_world, sae, out.site))
    expect(msg, "Invalid cfg")
    assert "sae_cfg.json" in msg
    assert out.intact()


def test_shape_mismatch(capsys, out, sae, tiny_world):
    sd = torch.load(sae, weights_only=True)
    sd["W_dec"] = sd["W_dec"][:, :, :31].contiguous()
    torch.save(sd, sae)
    msg = failing(capsys, *build_argv(tiny_world, sae, out.site))
    expect(msg, "Tensor shapes that disagree")
    assert "W_dec" in msg
    assert out.intact()


def test_unknown_hook_point(capsys, out, tiny_world):
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.sae_ckpt, out.site, "--hook-point", "blocks.1.hook_nope"))
    expect(msg, "Unknown hook point")
    assert "blocks.1.hook_nope" in msg
    assert out.intact()


def test_hook_point_beyond_the_last_layer(capsys, out, tiny_world):
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.sae_ckpt, out.site,
                                      "--hook-point", "blocks.7.hook_resid_post"))
    expect(msg, "Hook point on a layer the model lacks")
    assert "3 layers" in msg
    assert out.intact()


def test_model_width_differs_from_the_checkpoint(capsys, out, sae, tiny_world):
    sd = torch.load(sae, weights_only=True)
    half = {"W_enc": sd["W_enc"][:, :16], "W_dec": sd["W_dec"][:, :, :16], "b_enc": sd["b_enc"],
            "b_dec": sd["b_dec"][:, :16]}
    torch.save({k: v.contiguous() for k, v in half.items()}, sae)
    cfg = json.loads((sae.parent / "sae_cfg.json").read_text())
    cfg["d_in"] = 16
    (sae.parent / "sae_cfg.json").write_text(json.dumps(cfg))
    msg = failing(capsys, *build_argv(tiny_world, sae, out.site))
    expect(msg, "Model width differs from the checkpoint's")
    assert "width 32" in msg and "d_in=16" in msg
    assert out.intact()


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_non_finite_weights(capsys, out, sae, tiny_world, value):
    sd = torch.load(sae, weights_only=True)
    sd["W_dec"][3, 0, 7] = value
    torch.save(sd, sae)
    msg = failing(capsys, *build_argv(tiny_world, sae, out.site))
    expect(msg, "NaN or inf weights")
    assert "W_dec" in msg
    assert out.intact()


def test_two_models_with_different_tokenizers(capsys, out, tiny_world, tmp_path):
    other = tmp_path / "llama-other-tokenizer"
    shutil.copytree(tiny_world.llama_chat_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text("utf-8"))
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same strings under other ids
    (other / "tokenizer.json").write_text(json.dumps(tok), "utf-8")
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.crosscoder_ckpt, out.site,
                                      "--model", tiny_world.llama_dir, "--model", other))
    expect(msg, "Two models with different tokenizers")
    assert out.intact()


# --------------------------------------------------------------------------- corpus and results


def test_empty_corpus(capsys, out, tiny_world, tmp_path):
    corpus = tmp_path / "empty.jsonl"
    corpus.write_text('{"text": ""}\n{"text": "   "}\n', "utf-8")
    msg = failing(capsys, "build", tiny_world.sae_ckpt, "--dataset", corpus, "-o", out.site, *RUN)
    expect(msg, "Empty corpus")
    assert out.intact()


def test_named_and_unnamed_corpora_mixed(capsys, out, tiny_world):
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.sae_ckpt, out.site, "--dataset",
                                      f"web={tiny_world.corpus_txt}"))
    expect(msg, "Named and unnamed corpora mixed")
    assert out.intact()


@pytest.mark.parametrize("names", [("web", "web"), ("web", "chat room"), ("web", ".x")])
def test_corpus_name_given_twice_or_with_odd_characters(capsys, out, tiny_world, names):
    a, b = names
    msg = failing(capsys, "build", tiny_world.sae_ckpt, "--dataset", f"{a}={tiny_world.corpus_jsonl}", "--dataset",
                  f"{b}={tiny_world.corpus_txt}", "-o", out.site, *RUN)
    expect(msg, "Corpus name given twice or with odd characters")
    assert out.intact()


@pytest.mark.parametrize("spec", ["0.8:0.2", "0.3", "-0.1:0.5", "0.2:1.5", "a:b"])
def test_shared_range_that_is_not_a_range(capsys, out, tiny_world, spec):
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.crosscoder_ckpt, out.site, f"--shared-range={spec}"))
    expect(msg, "Shared range that is not a range")
    assert out.intact()


@pytest.mark.parametrize("flag", ["--corr-features", "--corr-candidates"])
def test_negative_count_of_correlated_features(capsys, out, tiny_world, flag):
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.crosscoder_ckpt, out.site, flag, "-1"))
    expect(msg, "Negative count of correlated features")
    assert out.intact()


def test_analysis_options_reach_the_cache(tiny_world, tmp_path, capsys):
    """--corr-features, --corr-candidates and --shared-range set what the cache holds."""
    from atlas.cache import read_cache

    cache = tmp_path / "cache"
    code = main([str(a) for a in ["analyze", tiny_world.crosscoder_ckpt, "--dataset", tiny_world.corpus_jsonl,
                                   "--model", tiny_world.llama_dir, "--model", tiny_world.llama_chat_dir,
                                   "-o", cache, *RUN, "--corr-features", "3", "--corr-candidates", "5",
                                   "--shared-range", "0.45:0.55", "--no-neuron-correlations"]])
    assert code == 0, capsys.readouterr().err
    c = read_cache(cache)
    st, fs = c.manifest.settings, c.features
    assert (st.n_corr_features, st.n_corr_candidates) == (3, 5)
    assert (st.diff_shared_lo, st.diff_shared_hi) == (0.45, 0.55)
    assert fs.fcorr_ids.shape == (c.manifest.n_features, 3) and fs.ncorr_val is None
    want = np.where(fs.rel_norm < 0.45, 0, np.where(fs.rel_norm > 0.55, 2, 1))
    np.testing.assert_array_equal(fs.diff_class, want)
    # every correlated feature is one of the feature's 5 nearest decoder neighbours
    assert fs.neighbours.shape[1] >= 5 and (fs.fcorr_ids >= 0).any()
    for f in range(c.manifest.n_features):
        ids = fs.fcorr_ids[f][fs.fcorr_ids[f] >= 0]
        assert set(ids) <= set(fs.neighbours[f, :5])


def test_corpus_too_short(capsys, out, tiny_world, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text("Just a few words.\n", "utf-8")
    msg = failing(capsys, "build", tiny_world.sae_ckpt, "--dataset", corpus, "-o", out.site, *RUN)
    expect(msg, "Corpus too short for one sequence")
    assert out.intact()


def test_all_features_dead(capsys, out, sae, tiny_world):
    sd = torch.load(sae, weights_only=True)
    sd["b_enc"][:] = -1e4
    torch.save(sd, sae)
    msg = failing(capsys, *build_argv(tiny_world, sae, out.site))
    expect(msg, "All features dead")
    assert "all 48 analysed features" in msg
    assert files(out.site) == {k[len("site/"):]: v for k, v in out.before.items() if k.startswith("site/")}
    # the analysis is kept: `atlas render` shows it when asked to
    cache = read_cache(out.cache)
    assert cache.manifest.complete and not cache.features.n_active.any()
    assert main(["render", str(out.cache), "-o", str(out.root / "dead-site")]) == 0


# --------------------------------------------------------------------------- output folders


@pytest.fixture
def readonly(tmp_path):
    """A folder in which nothing can be created (chmod for users; the immutable attribute for root)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    state = {"locked": False}

    def lock():
        if os.geteuid() != 0:
            folder.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("running as root where chattr +i is not available: no folder can be read-only")
        state["locked"] = True

    yield folder, lock
    if state["locked"]:
        if os.geteuid() != 0:
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_unwritable_output_folder(capsys, previous, readonly, tiny_world):
    folder, lock = readonly
    shutil.copytree(previous, folder, dirs_exist_ok=True)
    lock()
    before = files(folder)
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.sae_ckpt, folder / "site", "--seed", "3"))
    expect(msg, "Output folder not writable")
    assert str(folder) in msg
    msg = failing(capsys, "render", folder / "site.atlas-data", "-o", folder / "site", "--title", "New")
    expect(msg, "Output folder not writable")
    msg = failing(capsys, "analyze", tiny_world.sae_ckpt, "--dataset", tiny_world.corpus_jsonl,
                  "-o", folder / "new-cache", *RUN)
    expect(msg, "Output folder not writable")
    assert files(folder) == before


def test_disk_full_while_writing_the_cache(capsys, out, tiny_world, monkeypatch, tmp_path):
    """The analysis fails on its 4th file (features.npz): no half-written file, the old site intact, and the
    rerun resumes and ends with the cache and site of a run that never failed."""
    argv = build_argv(tiny_world, tiny_world.sae_ckpt, out.site, "--seed", "1", "--save-every", "1")
    disk = _OsWithFullDisk(after=3)
    monkeypatch.setattr(atlas.cache, "os", disk)
    msg = failing(capsys, *argv)
    expect(msg, "Disk full")
    assert disk.opened == 4
    monkeypatch.undo()
    assert not [p for p in out.root.rglob("*") if p.name.endswith(".tmp")], "half-written files left"
    assert files(out.site) == {k[len("site/"):]: v for k, v in out.before.items() if k.startswith("site/")}
    assert read_manifest(out.cache).complete is False  # render refuses it until the analysis finishes
    assert main(["render", str(out.cache), "-o", str(tmp_path / "other-site")]) == 2
    assert (out.cache / "state" / "summaries.pt").is_file()
    capsys.readouterr()

    assert main([str(a) for a in argv]) == 0
    assert "resuming the analysis after batch 1" in capsys.readouterr().out
    reference = tmp_path / "reference" / "site"
    assert main([str(a) for a in build_argv(tiny_world, tiny_world.sae_ckpt, reference, "--seed", "1")]) == 0
    assert_same_cache(out.cache, reference.parent / "site.atlas-data")
    assert files(out.site) == files(reference)


def test_disk_full_while_rendering(capsys, out, monkeypatch):
    import atlas.render.output
    import atlas.render.site

    real_open = open
    budget = {"files": 12}

    def open_on_a_filling_disk(path, mode="r", *args, **kwargs):
        fh = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            budget["files"] -= 1
            if budget["files"] < 0:
                return _Filling(fh)
        return fh

    for module in (atlas.render.output, atlas.render.site):
        monkeypatch.setattr(module, "open", open_on_a_filling_disk, raising=False)
    msg = failing(capsys, "render", out.cache, "-o", out.site, "--title", "Renamed")
    expect(msg, "Disk full")
    assert budget["files"] < 0
    assert out.intact()  # the old site byte for byte, the cache, and no staging folder
    monkeypatch.undo()
    assert main(["render", str(out.cache), "-o", str(out.site), "--title", "Renamed"]) == 0
    assert "Renamed" in (out.site / "index.html").read_text("utf-8")


def test_output_folder_that_is_not_an_atlas(capsys, tiny_world, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("precious", "utf-8")
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.sae_ckpt, thesis))
    expect(msg, "Output folder holds something else")
    assert files(tmp_path) == {"thesis/thesis.tex": b"precious"}  # refused before the analysis: no cache either


def test_cache_folder_that_is_not_a_cache(capsys, out, tiny_world, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("keep me", "utf-8")
    msg = failing(capsys, "analyze", tiny_world.sae_ckpt, "--dataset", tiny_world.corpus_jsonl, "-o", notes, *RUN)
    expect(msg, "Cache folder holds something else")
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.sae_ckpt, out.site, "--cache", notes))
    expect(msg, "Cache folder holds something else")
    assert files(notes) == {"todo.md": b"keep me"}
    assert out.intact()


def test_output_path_is_a_file(capsys, out, tiny_world, tmp_path):
    paper = tmp_path / "paper.pdf"
    paper.write_bytes(b"%PDF-1.7")
    msg = failing(capsys, *build_argv(tiny_world, tiny_world.sae_ckpt, paper))
    expect(msg, "Output path is a file")
    msg = failing(capsys, "render", out.cache, "-o", paper)
    expect(msg, "Output path is a file")
    msg = failing(capsys, "analyze", tiny_world.sae_ckpt, "-o", paper, *RUN)
    expect(msg, "Output path is a file")
    assert paper.read_bytes() == b"%PDF-1.7"
    assert out.intact()


@pytest.mark.parametrize("damage", ["truncated examples", "unfinished", "no vocab"])
def test_damaged_cache(capsys, out, damage):
    if damage == "truncated examples":
        data = (out.cache / "examples.npz").read_bytes()
        (out.cache / "examples.npz").write_bytes(data[: len(data) // 3])
    elif damage == "unfinished":
        manifest = json.loads((out.cache / "manifest.json").read_text())
        manifest["complete"] = False
        (out.cache / "manifest.json").write_text(json.dumps(manifest))
    else:
        (out.cache / "vocab.json").unlink()
    out.before = files(out.root)
    msg = failing(capsys, "render", out.cache, "-o", out.site, "--title", "New")
    expect(msg, "Damaged or unfinished analysis cache")
    assert out.intact()


# --------------------------------------------------------------------------- a failing render publishes nothing


def test_render_failing_midway_keeps_the_previous_site(capsys, out, monkeypatch):
    """An exception after half the feature pages are written: the old site byte-identical, no temp folder."""
    import atlas.render.site

    real = atlas.render.site.iter_features
    seen = {"pages": 0}

    def iter_features(*args, **kwargs):
        for item in real(*args, **kwargs):
            seen["pages"] += 1
            if seen["pages"] > 20:
                raise RuntimeError("injected failure in the middle of the feature pages")
            yield item

    monkeypatch.setattr(atlas.render.site, "iter_features", iter_features)
    with pytest.raises(RuntimeError, match="injected"):
        main(["render", str(out.cache), "-o", str(out.site), "--title", "New"])
    assert seen["pages"] == 21
    assert out.intact()


def test_render_failing_while_swapping_folders_restores_the_previous_site(capsys, out, monkeypatch):
    """The rename that moves the new site into place fails after the old one was moved aside: put back."""
    import atlas.render.output

    class OsRenameFails:
        def __init__(self):
            self.renames = 0

        def __getattr__(self, name):
            return getattr(os, name)

        def rename(self, src, dst):
            self.renames += 1
            if self.renames == 2:
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))
            os.rename(src, dst)

    fake = OsRenameFails()
    monkeypatch.setattr(atlas.render.output, "os", fake)
    failing(capsys, "render", out.cache, "-o", out.site, "--title", "New")
    assert fake.renames == 3  # old site aside, the failed move, old site back
    assert out.intact()


def test_render_killed_midway_keeps_the_previous_site_and_the_next_render_cleans_up(tmp_path, capsys):
    """kill -9 in the middle of `atlas render`: the old site is untouched; the next render completes and
    removes the dead render's staging folder."""
    from synthetic_cache import write_synthetic_cache

    cache = write_synthetic_cache(tmp_path / "cache", n_features=800, n_sources=2, vocab_size=1000,
                                  n_sequences=32, seq_len=48, seed=2)
    site = tmp_path / "www" / "site"
    site.mkdir(parents=True)
    (site / "atlas-site.json").write_text('{"first_id": 0, "n_features": 0}', "utf-8")
    (site / "index.html").write_text("<p>the published atlas</p>", "utf-8")
    before = files(tmp_path / "www")

    proc = _spawn_atlas(["render", str(cache), "-o", str(site), "--title", "New"], tmp_path / "render.log")
    try:
        deadline = time.monotonic() + 60
        staged = []
        while time.monotonic() < deadline:
            staged = [p for p in site.parent.glob(".site.rendering-*") if (p / "f").is_dir()]
            if staged and len(os.listdir(staged[0] / "f")) >= 50:
                break
            time.sleep(0.01)
        proc.kill()
    finally:
        code = _exit_code(proc)
    assert code == -signal.SIGKILL, (tmp_path / "render.log").read_text()
    assert staged and staged[0].is_dir(), "the render was not killed while it wrote pages"
    assert files(site) == {k[len("site/"):]: v for k, v in before.items() if k.startswith("site/")}

    assert main(["render", str(cache), "-o", str(site), "--title", "New"]) == 0
    assert "New" in (site / "index.html").read_text("utf-8")
    assert sorted(p.name for p in site.parent.iterdir()) == ["site"]  # the dead render's folder is gone


def test_temporary_files_of_a_killed_analysis_are_removed(capsys, out, tiny_world):
    """What kill -9 can leave while the cache is written (a temporary file beside each cache file) is
    removed when the next analysis writes the cache."""
    left = [out.cache / f".{name}.x1y2z3.tmp" for name in ("examples.npz", "manifest.json", "vocab.json")]
    for path in left:
        path.write_bytes(b"half of a file")
    assert main([str(a) for a in build_argv(tiny_world, tiny_world.sae_ckpt, out.site, "--seed", "2")]) == 0
    assert not [p.name for p in out.cache.iterdir() if p.name.startswith(".")]
    read_cache(out.cache)


# --------------------------------------------------------------------------- interrupted analysis


# A spawned analysis: each batch waits 10 ms, so that a signal sent after the first saved state reliably
# arrives mid-analysis however fast the machine runs the tiny model (120 batches: at least 1.2 s).
PACED_ATLAS = """
import signal, sys, time
# Ctrl-C as in a terminal, also where the tests run as a background job (which starts with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
import atlas.stats.summaries as summaries
_update = summaries.FeatureSummaries.update
def paced(self, *args, **kwargs):
    time.sleep(0.01)
    return _update(self, *args, **kwargs)
summaries.FeatureSummaries.update = paced
from atlas.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _spawn_atlas(argv: list[str], log: Path) -> subprocess.Popen:
    """Start ``atlas ARGV`` (paced: :data:`PACED_ATLAS`) in a new interpreter (a real process that signals
    reach), its output going to ``log``. A fresh interpreter, not a fork of this one: a fork inherits
    torch's thread pools in whatever state the earlier tests left them, and can hang."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-c", PACED_ATLAS, *argv], stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env)


def _exit_code(proc: subprocess.Popen) -> int:
    return proc.wait()


def _analyze_argv(world, cache: Path) -> list[str]:
    return ["analyze", str(world.sae_ckpt), "--dataset", str(world.corpus_jsonl), "-o", str(cache), "-n", "0",
            "-s", "240", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]


def test_interrupted_analysis_resumes_to_the_same_cache(previous, tiny_world, tmp_path, capsys):
    """SIGINT, SIGTERM and SIGKILL in the middle of `atlas analyze` runs; each rerun resumes from the saved
    state and ends with the cache of an uninterrupted run."""
    signals = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
    procs = {name: _spawn_atlas(_analyze_argv(tiny_world, tmp_path / name) + ["--save-every", "5"],
                              tmp_path / f"{name}.log") for name in signals}
    try:
        waiting = dict(signals)
        deadline = time.monotonic() + 120
        while waiting and time.monotonic() < deadline:
            for name, sig in list(waiting.items()):
                if (tmp_path / name / "state" / "summaries.pt").exists():
                    time.sleep(0.05)  # a few more batches
                    procs[name].send_signal(sig)
                    del waiting[name]
            time.sleep(0.01)
        for name in waiting:
            procs[name].kill()
        assert not waiting, f"no analysis state was saved by {sorted(waiting)}"
    finally:
        codes = {name: _exit_code(proc) for name, proc in procs.items()}
    for name, sig in signals.items():
        log = (tmp_path / f"{name}.log").read_text("utf-8")
        assert "Traceback" not in log, log
        if sig == signal.SIGKILL:
            assert codes[name] == -signal.SIGKILL
        else:
            assert codes[name] == 130, log
            assert log.rstrip().splitlines()[-1] == "atlas: interrupted; rerun the same command to resume"
        assert not (tmp_path / name / "manifest.json").exists(), f"{name} came after the analysis finished"
        assert (tmp_path / name / "state" / "summaries.pt").is_file()

    reference = tmp_path / "reference"
    assert main(_analyze_argv(tiny_world, reference)) == 0
    capsys.readouterr()
    for name in signals:
        cache = tmp_path / name
        assert main(_analyze_argv(tiny_world, cache)) == 0
        resumed = re.search(r"resuming the analysis after batch (\d+)", capsys.readouterr().out)
        assert resumed and int(resumed.group(1)) >= 5, name
        assert_same_cache(cache, reference)
        assert not (cache / "state").exists()
        assert not [p for p in cache.rglob("*") if p.name.startswith(".")], "temporary files left"
