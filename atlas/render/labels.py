"""User labels and explanations of features (``--labels FILE``).

Accepted files:

- JSON object ``{"<id>": "label", ...}`` (a value may also be ``{"label": ..., "explanation": ...}``)
- JSON list ``[{"id": 3, "label": "...", "explanation": "..."}, ...]`` (explanation optional)
- CSV with a header row naming ``id`` and ``label`` columns (and optionally ``explanation``)

Labels are untrusted text: templates autoescape them and the browser inserts them with ``textContent``.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import AtlasError

MAX_LABEL_CHARS = 500
MAX_EXPLANATION_CHARS = 5000


@dataclass(frozen=True)
class Label:
    label: str
    explanation: str = ""


def _bad(path: Path, why: str) -> AtlasError:
    return AtlasError(
        f"cannot use labels file {path}: {why}; give JSON ({{\"<id>\": \"label\"}} or "
        f"[{{\"id\": 0, \"label\": \"...\", \"explanation\": \"...\"}}]) or CSV with columns id,label[,explanation]"
    )


def _feature_id(path: Path, raw, where: str) -> int:
    try:
        if isinstance(raw, bool):
            raise ValueError
        fid = int(str(raw).strip())
    except (TypeError, ValueError):
        raise _bad(path, f"{where}: feature id {raw!r} is not an integer") from None
    if fid < 0:
        raise _bad(path, f"{where}: feature id {fid} is negative")
    return fid


def _text(path: Path, raw, where: str, limit: int) -> str:
    if raw is None:
        return ""
    if not isinstance(raw, (str, int, float)) or isinstance(raw, bool):
        raise _bad(path, f"{where}: expected text, found {type(raw).__name__}")
    return str(raw).strip()[:limit]


def _from_json(path: Path, data) -> dict[int, Label]:
    out: dict[int, Label] = {}
    if isinstance(data, dict):
        items = list(data.items())
        for key, value in items:
            fid = _feature_id(path, key, f"key {key!r}")
            if isinstance(value, dict):
                out[fid] = Label(_text(path, value.get("label"), f"id {fid}", MAX_LABEL_CHARS),
                                 _text(path, value.get("explanation"), f"id {fid}", MAX_EXPLANATION_CHARS))
            else:
                out[fid] = Label(_text(path, value, f"id {fid}", MAX_LABEL_CHARS))
    elif isinstance(data, list):
        for n, row in enumerate(data):
            if not isinstance(row, dict) or "id" not in row:
                raise _bad(path, f"entry {n} is not an object with an \"id\"")
            fid = _feature_id(path, row["id"], f"entry {n}")
            out[fid] = Label(_text(path, row.get("label"), f"entry {n}", MAX_LABEL_CHARS),
                             _text(path, row.get("explanation"), f"entry {n}", MAX_EXPLANATION_CHARS))
    else:
        raise _bad(path, "the JSON is neither an object nor a list")
    return out


def _from_csv(path: Path, text: str) -> dict[int, Label]:
    reader = csv.DictReader(io.StringIO(text))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    if "id" not in fields or "label" not in fields:
        raise _bad(path, f"the CSV header {reader.fieldnames!r} lacks an id or label column")
    reader.fieldnames = fields
    out: dict[int, Label] = {}
    for n, row in enumerate(reader, start=2):
        if None in row:
            raise _bad(path, f"line {n} has more fields than the header")
        fid = _feature_id(path, row.get("id"), f"line {n}")
        out[fid] = Label(_text(path, row.get("label"), f"line {n}", MAX_LABEL_CHARS),
                         _text(path, row.get("explanation"), f"line {n}", MAX_EXPLANATION_CHARS))
    return out


def load_labels(path: str | Path | None) -> dict[int, Label]:
    """Read a labels file (see the module docstring); ``None`` gives no labels. Bad files raise AtlasError."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise _bad(path, "no such file")
    try:
        text = path.read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _bad(path, f"cannot read it as UTF-8 text ({exc})") from None
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" or stripped[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _bad(path, f"invalid JSON ({exc})") from None
        labels = _from_json(path, data)
    else:
        try:
            labels = _from_csv(path, text)
        except csv.Error as exc:
            raise _bad(path, f"invalid CSV ({exc})") from None
    return {fid: lab for fid, lab in labels.items() if lab.label or lab.explanation}
