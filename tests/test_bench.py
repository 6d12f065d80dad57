"""``bench/analysis.py`` ends its output with one line a script can parse (``ratio: ...``)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from analysis import parse_ratio_line, ratio_line  # noqa: E402


def test_ratio_line_reads_back():
    line = ratio_line(1.4567, 1.234)
    assert line == "ratio: analysis/forward = 1.46 (4x tokens), marginal 1.23"
    assert parse_ratio_line(line) == (1.46, 4, 1.23)
    assert parse_ratio_line(ratio_line(12.0, -0.5, factor=8) + "\n") == (12.0, 8, -0.5)
    ratio, _, marginal = parse_ratio_line(ratio_line(2.0, float("nan")))  # a marginal with no extra forward time
    assert ratio == 2.0 and math.isnan(marginal)
    for other in ("analysis / forward time: 2.06× at 1×", "ratio: analysis/forward = 1.46", ""):
        with pytest.raises(ValueError, match="not a ratio line"):
            parse_ratio_line(other)


@pytest.mark.slow
def test_analysis_benchmark_ends_with_the_ratio_line():
    """A tiny run of the script (no model given: it builds its tiny Llama): the last line of its output
    parses, and holds the 4× ratio and the marginal ratio its summary line printed above it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = subprocess.run([sys.executable, str(REPO / "bench" / "analysis.py"), "--tokens", "256", "--features", "64",
                          "--batch-size", "4", "--seq-len", "32"], capture_output=True, text=True, timeout=300,
                         env=env, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.rstrip("\n").splitlines()
    ratio, factor, marginal = parse_ratio_line(lines[-1])
    summary = re.search(r"at 1×, (\d+\.\d+)× \(.*\) at 4×; marginal \(per extra token\) ([-\d.]+|nan)×", lines[-2])
    assert summary, lines[-2]
    assert factor == 4 and ratio > 0
    assert (f"{ratio:.2f}", f"{marginal:.2f}") == (summary.group(1), summary.group(2))
