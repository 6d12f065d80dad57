"""The text corpus as fixed-length token sequences (``torch.LongTensor[N, T]``).

Called by :mod:`atlas.build`; the result goes to :mod:`atlas.analyze` and ends up in the cache's
``tokens.npy``.

How sequences are made (deterministic for a given corpus, tokenizer and seed):

1. Documents are read in streaming mode (nothing is cached on disk), from a local
   ``.txt`` (one document per paragraph, i.e. blank-line separated), ``.jsonl``/``.json``,
   ``.parquet`` or ``.csv`` file, a folder of them (recursively, sorted by path), or a hub dataset name
   (split ``train``) when the hub is reachable; ``.txt`` and ``.jsonl`` files are read by plain Python
   readers that give the rows ``datasets`` would, the other formats and hub datasets through ``datasets``
   (imported only then). Their order is shuffled with ``seed``: local files are
   read in a seeded random order, and documents pass through a seeded shuffle buffer of
   :data:`SHUFFLE_BUFFER` documents (``random.Random(seed)``; datasets' own streaming shuffle is not used
   because it stalls for seconds on parquet files). Empty documents are skipped.
2. Each document is tokenised without special tokens; documents are concatenated with the tokenizer's
   EOS token between them (BOS when there is no EOS).
3. The stream is cut into consecutive pieces of ``seq_len - 1`` tokens, each prefixed with BOS (or of
   ``seq_len`` tokens without a prefix when the tokenizer has no BOS). Reading stops as soon as
   ``n_sequences`` sequences are full; an incomplete last piece is dropped.

Named corpora (``--dataset NAME=PATH``, repeatable; :func:`parse_datasets`, :func:`load_corpora`): the
``n_sequences`` are shared equally among the corpora (``n // C`` each, the first ``n % C`` corpora one
more), each corpus is cut into sequences as above on its own, and the sequences are concatenated in
corpus order. :class:`CorpusSplit` records which corpus each sequence came from (the cache's
``corpus_ids.npy`` and ``Manifest.corpora``). A plain ``--dataset PATH`` is one unnamed corpus, as before;
no ``--dataset`` means the demo's two corpora (``english`` and ``python``).
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import torch

from .errors import AtlasError

SHUFFLE_BUFFER = 10_000
TOKENIZE_BATCH = 256

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _local_files(path: Path) -> dict[str, list[str]]:
    """Builder name → sorted files, for a corpus file or folder."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BUILDERS)
        if not files:
            raise AtlasError(f"the corpus folder {path} holds no .txt, .jsonl, .json, .parquet or .csv file: "
                             "pass --dataset with a folder or file of text")
    groups: dict[str, list[str]] = {}
    for f in files:
        builder = _BUILDERS.get(f.suffix.lower())
        if builder is None:
            raise AtlasError(f"cannot read {f} as a corpus: pass --dataset with a .txt, .jsonl, .json, "
                             ".parquet or .csv file (or a folder of them)")
        groups.setdefault(builder, []).append(str(f))
    return groups


def _text_rows(files: list[str], dataset: str):
    """Rows ``{"text": paragraph}`` of ``.txt`` files as ``datasets``' text builder with ``sample_by=
    "paragraph"`` gives them: text mode (universal newlines), split on blank lines (``"\\n\\n"``), empty
    pieces dropped; read in blocks, so a large file is never held whole."""
    for name in files:
        with open(name, encoding="utf-8") as fh, _utf8_only(name, dataset):
            rest = ""
            while True:
                block = fh.read(1 << 20)
                if not block:
                    break
                pieces = (rest + block + fh.readline()).split("\n\n")
                rest = pieces.pop()
                yield from ({"text": p} for p in pieces if p)
            if rest:
                yield {"text": rest}


@contextlib.contextmanager
def _utf8_only(name: str, dataset: str):
    """Turn a decoding failure while reading the file ``name`` into one message naming it."""
    try:
        yield
    except UnicodeDecodeError as exc:
        raise AtlasError(f"cannot read the corpus {dataset}: {name} is not UTF-8 text ({exc.reason}): convert it "
                         "to UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8)") from None


def _jsonl_rows(files: list[str], dataset: str):
    """Rows (JSON objects) of ``.jsonl`` files, one per non-blank line, as ``datasets``' json builder reads them."""
    import json

    for name in files:
        with open(name, encoding="utf-8") as fh, _utf8_only(name, dataset):
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise AtlasError(f"cannot read the corpus {dataset}: line {n} of {name} is not JSON ({exc}): "
                                     "pass --dataset with a JSON-lines file (one object per line)") from None
                if not isinstance(row, dict):
                    raise AtlasError(f"cannot read the corpus {dataset}: line {n} of {name} is not a JSON object: "
                                     "pass --dataset with a JSON-lines file (one object per line)")
                yield row


def _plain_rows(builder: str, files: list[str], dataset: str):
    """Rows of local ``.txt`` or ``.jsonl`` files read without ``datasets`` (whose import alone costs about
    half a second of CPU), the same rows in the same order; None for other formats."""
    if builder == "text":
        return _text_rows(files, dataset)
    if builder == "json" and all(f.lower().endswith(".jsonl") for f in files):
        return _jsonl_rows(files, dataset)
    return None


def _open_streams(dataset: str, seed: int) -> list:
    """Iterables of rows (local files in a seeded order): plain readers for ``.txt`` and ``.jsonl``,
    streaming ``datasets`` for the other formats and hub datasets."""
    path = Path(dataset).expanduser()
    streams = []
    if path.exists():
        rng = random.Random(seed)
        for builder, files in _local_files(path).items():
            rng.shuffle(files)
            plain = _plain_rows(builder, files, dataset)
            if plain is not None:
                streams.append(plain)
                continue
            import datasets

            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
            except Exception as exc:  # noqa: BLE001 - any reader failure is a bad corpus file
                raise AtlasError(f"cannot read the corpus {dataset} ({type(exc).__name__}: {exc}): pass "
                                 "--dataset with a readable text file") from exc
            streams.append(ds)
        return streams
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split="train", streaming=True)
    except Exception as exc:  # noqa: BLE001 - offline, unknown name, no train split, ...
        raise AtlasError(
            f"dataset {dataset!r} is not a local file or folder and cannot be loaded from the Hugging Face hub "
            f"({type(exc).__name__}); pass --dataset with a local .txt/.jsonl/.json/.parquet/.csv file or "
            "folder, or allow network access (unset HF_DATASETS_OFFLINE)"
        ) from exc
    return [ds]


def _shuffled(items, seed: int, buffer_size: int = SHUFFLE_BUFFER):
    """Seeded buffer shuffle: each arriving item replaces a random buffered one, which is yielded."""
    rng = random.Random(seed)
    buffer = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def iter_documents(dataset: str, text_column: str = "text", seed: int = 0):
    """Yield the corpus's non-empty documents (strings) in their seeded order."""
    return _shuffled(_read_documents(dataset, text_column, seed), seed)


def _read_documents(dataset: str, text_column: str, seed: int):
    """The documents of every stream; a row without ``text_column`` is skipped (``datasets`` gives it as
    None), and a corpus where no row has it is refused."""
    columns, found = set(), False
    for stream in _open_streams(dataset, seed):
        for row in stream:
            if text_column not in row:
                columns.update(row)
                continue
            found = True
            text = row[text_column]
            if isinstance(text, str) and text.strip():
                yield text
    if columns and not found:
        raise AtlasError(f"the corpus {dataset} has no column {text_column!r} (columns: {', '.join(sorted(columns))}): "
                         "pass --text-column with the column holding the text")


def _batched(it, n):
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def load_corpus(dataset: str, tokenizer, n_sequences: int, seq_len: int, text_column: str = "text",
                seed: int = 0) -> torch.LongTensor:
    """``[N, seq_len]`` token ids cut from the corpus (see the module docstring); N ≤ ``n_sequences``."""
    if n_sequences < 1:
        raise AtlasError(f"--n-samples must be at least 1 (got {n_sequences})")
    bos = tokenizer.bos_token_id
    if seq_len < (2 if bos is not None else 1):
        raise AtlasError(f"--seq-len {seq_len} is too short: pass --seq-len 2 or more")
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    body = seq_len - 1 if bos is not None else seq_len
    need = n_sequences * body

    stream: list[int] = []
    n_docs = 0
    for texts in _batched(iter_documents(dataset, text_column, seed), TOKENIZE_BATCH):
        for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
            if n_docs and separator is not None:
                stream.append(separator)
            stream.extend(ids)
            n_docs += 1
        if len(stream) >= need:
            break
    if not stream:
        raise AtlasError(f"the corpus {dataset} is empty (no text in column {text_column!r}): pass --dataset "
                         "with a corpus that holds text")
    n = min(n_sequences, len(stream) // body)
    if n == 0:
        raise AtlasError(f"corpus too short: {dataset} gives {len(stream)} tokens, but one sequence needs "
                         f"{body}: pass a smaller --seq-len or a larger --dataset")
    if n < n_sequences:
        print(f"atlas: the corpus gives only {n} sequences of {seq_len} tokens (asked for {n_sequences}); "
              f"using {n}", file=sys.stderr)
    rows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        rows = torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


CORPUS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_NAMED = re.compile(r"([^=/\\]*)=(.*)", re.S)  # NAME=PATH: an "=" before any path separator


def parse_datasets(values: list[str] | None) -> list[tuple[str, str]]:
    """``--dataset`` values → ``[(name, path)]``: ``NAME=PATH`` values, or one plain ``PATH`` (name ``""``);
    none given → the demo's corpora. Raises AtlasError for a mix of named and unnamed values, duplicate
    names, several unnamed values, or a name with other characters than letters, digits, ``_ . -``."""
    if not values:
        from .demo import DEMO_CORPORA

        return [(name, str(path)) for name, path in DEMO_CORPORA.items()]
    parsed = []
    for value in values:
        m = _NAMED.fullmatch(value)
        if m is None:
            parsed.append(("", value))
            continue
        name, path = m.group(1).strip(), m.group(2).strip()
        if not CORPUS_NAME.fullmatch(name):
            raise AtlasError(f"--dataset {value!r}: the corpus name {name!r} must be 1-32 letters, digits, '_', "
                             "'.' or '-' starting with a letter or digit: pass --dataset NAME=PATH with such a name, "
                             "e.g. --dataset web=web.jsonl")
        if not path:
            raise AtlasError(f"--dataset {value!r} names no corpus file: pass --dataset {name}=PATH")
        parsed.append((name, path))
    named = [n for n, _ in parsed if n]
    if named and len(named) < len(parsed):
        raise AtlasError("--dataset mixes named (NAME=PATH) and unnamed (PATH) corpora: name every corpus, "
                         "e.g. --dataset web=a.jsonl --dataset chat=b.jsonl")
    if not named and len(parsed) > 1:
        raise AtlasError("--dataset is given several times without names: name each corpus, e.g. "
                         "--dataset web=a.jsonl --dataset chat=b.jsonl (or pass one --dataset)")
    seen = set()
    for name in named:
        if name in seen:
            raise AtlasError(f"--dataset names the corpus {name!r} twice: give each corpus its own name "
                             "(--dataset NAME=PATH)")
        seen.add(name)
    return parsed


def share_sequences(n_sequences: int, n_corpora: int) -> list[int]:
    """Equal shares of ``n_sequences`` among ``n_corpora`` corpora; the first ``n % C`` get one more."""
    base, extra = divmod(n_sequences, n_corpora)
    return [base + (1 if i < extra else 0) for i in range(n_corpora)]


@dataclass
class CorpusSplit:
    """The analysed sequences and where they came from.

    ``tokens[N, T]``: the sequences, corpus after corpus; ``corpora``: per corpus ``{name, path,
    n_sequences}`` in that order (``Manifest.corpora``; empty for one unnamed corpus).
    """

    tokens: torch.LongTensor
    corpora: list[dict]

    def corpus_ids(self) -> np.ndarray:
        """``int16[N]``: the index in ``corpora`` of each sequence's corpus (all 0 for one unnamed corpus)."""
        return corpus_ids(self.corpora, self.tokens.shape[0])


def corpus_ids(corpora: list[dict], n_sequences: int) -> np.ndarray:
    """``int16[N]``: per sequence the index of its corpus, from the corpora's sequence counts (in order)."""
    if not corpora:
        return np.zeros(n_sequences, dtype=np.int16)
    ids = np.repeat(np.arange(len(corpora), dtype=np.int16), [int(c["n_sequences"]) for c in corpora])
    if ids.shape[0] != n_sequences:
        raise ValueError(f"the corpora hold {ids.shape[0]} sequences, not {n_sequences}")
    return ids


def load_corpora(datasets: list[str] | None, tokenizer, n_sequences: int, seq_len: int,
                 text_column: str = "text", seed: int = 0) -> CorpusSplit:
    """The sequences of the ``--dataset`` values (see the module docstring)."""
    specs = parse_datasets(datasets)
    if len(specs) == 1 and not specs[0][0]:
        tokens = load_corpus(specs[0][1], tokenizer, n_sequences, seq_len, text_column, seed)
        return CorpusSplit(tokens=tokens, corpora=[])
    if n_sequences < len(specs):
        raise AtlasError(f"--n-samples {n_sequences} is fewer than the {len(specs)} corpora: pass --n-samples "
                         f"{len(specs)} or more (the sequences are shared equally among the corpora)")
    parts, corpora = [], []
    for (name, path), share in zip(specs, share_sequences(n_sequences, len(specs))):
        rows = load_corpus(path, tokenizer, share, seq_len, text_column, seed)
        parts.append(rows)
        corpora.append({"name": name, "path": path, "n_sequences": int(rows.shape[0])})
    return CorpusSplit(tokens=torch.cat(parts, dim=0), corpora=corpora)
