"""Same inputs and seed → a byte-identical site, over two full `atlas build` runs.

The second run is a separate interpreter with another hash seed, another output folder name and another
clock (the cache manifest's ``created`` time, the only timestamp atlas writes, must not reach the site).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlas.cli import main

torch.set_num_threads(1)
pytestmark = pytest.mark.slow  # two full builds, one in a fresh interpreter

LATER = "2031-05-04T03:02:01+00:00"
# the second build: atlas.analyze's clock says LATER
SECOND = f"""
import datetime as _dt, sys
import atlas.analyze
class _Later(_dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return _dt.datetime.fromisoformat({LATER!r})
atlas.analyze.datetime = _Later
from atlas.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _argv(world, site: Path) -> list[str]:
    return ["build", str(world.crosscoder_ckpt), "--model", str(world.llama_chat_dir), "--dataset",
            str(world.corpus_jsonl), "-o", str(site), "-n", "0", "-s", "12", "--seq-len", "32", "--batch-size", "5",
            "--device", "cpu", "--seed", "7"]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def _restore_sigterm():
    old = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, old)


def test_two_builds_give_byte_identical_sites(tiny_world, tmp_path, _restore_sigterm):
    first, second = tmp_path / "build-qx7" / "atlas", tmp_path / "build-zk9" / "published-site"
    env = dict(os.environ, PYTHONHASHSEED="4242", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SECOND, *_argv(tiny_world, second)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        assert main(_argv(tiny_world, first)) == 0  # meanwhile, in this process
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err

    created = [json.loads((site.parent / f"{site.name}.atlas-data" / "manifest.json").read_text())["created"]
               for site in (first, second)]
    assert created[1] == LATER and created[0] != LATER  # the two analyses did run at different times

    a, b = _files(first), _files(second)
    assert sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert not different, f"files that differ between the two builds: {different[:10]}"
    assert len(a) > 64  # every feature page, the index, the overview, the data files
    for stamp in created:
        for text in (stamp, stamp[:10]):
            leaks = [name for name, data in a.items() if text.encode() in data]
            assert not leaks, f"the analysis time {text} appears in {leaks[:5]}"
    for folder in ("build-qx7", "build-zk9", "atlas.atlas-data", "published-site"):
        leaks = [name for name, data in a.items() if f"/{folder}".encode() in data]
        assert not leaks, f"the output path ({folder}) appears in {leaks[:5]}"
