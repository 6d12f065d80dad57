"""Shared helpers of the demo training scripts: corpus splits, token windows, provenance records."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from atlas.demo import DEMO_CORPORA  # noqa: E402

PROVENANCE = ROOT / "demo" / "provenance.json"
# <|endoftext|>: SmolLM2's document separator. Every training window starts with it and that position is
# left out of losses and crosscoder data (like a BOS token).
DOC_SEP_ID = 0


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def interleave(brown: list[dict], pydoc: list[dict]) -> list[dict]:
    """Brown documents in order with the Python-docs chunks spread evenly among them (the order the
    training scripts have always read the demo corpus in)."""
    docs: list[dict] = []
    step = len(brown) / len(pydoc)
    j = 0
    for i, d in enumerate(brown):
        docs.append(d)
        while j < len(pydoc) and (j + 1) * step <= i + 1:
            docs.append(pydoc[j])
            j += 1
    docs.extend(pydoc[j:])
    return docs


def load_corpus() -> list[dict]:
    """Every document of the demo's two corpora (english: Brown, python: pydoc), interleaved."""
    return interleave(read_jsonl(DEMO_CORPORA["english"]), read_jsonl(DEMO_CORPORA["python"]))


def pydoc_topic(doc: dict) -> str:
    return doc["id"].split("/", 1)[1].split("#", 1)[0]


def split_pydoc(docs: list[dict], every: int = 8) -> tuple[list[dict], list[dict]]:
    """Python-docs chunks split by topic: every ``every``-th topic (sorted by name) is held out."""
    pydoc = [d for d in docs if d["source"] == "pydoc"]
    topics = sorted({pydoc_topic(d) for d in pydoc})
    held = {t for i, t in enumerate(topics) if i % every == every - 1}
    return [d for d in pydoc if pydoc_topic(d) not in held], [d for d in pydoc if pydoc_topic(d) in held]


def token_stream(tokenizer, docs: list[dict]) -> torch.Tensor:
    """All documents tokenised and concatenated, each followed by the document separator."""
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d["text"], add_special_tokens=False)["input_ids"])
        ids.append(DOC_SEP_ID)
    return torch.tensor(ids, dtype=torch.long)


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]``: the separator token then ``seq_len - 1`` stream tokens."""
    body = seq_len - 1
    n = len(stream) // body
    w = stream[: n * body].view(n, body)
    return torch.cat([torch.full((n, 1), DOC_SEP_ID, dtype=torch.long), w], dim=1)


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def update_provenance(section: str, record: dict, path: Path = PROVENANCE) -> None:
    """Replace one section of demo/provenance.json, keeping the others."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[section] = record
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def file_size(path: Path) -> int:
    return Path(path).stat().st_size
