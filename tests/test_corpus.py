"""atlas.corpus: reading local corpora through datasets and cutting fixed-length sequences."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from atlas.corpus import iter_documents, load_corpus
from atlas.errors import AtlasError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _stream(tok, docs):
    """Brute force: every document tokenised alone, EOS between documents."""
    out = []
    for i, d in enumerate(docs):
        if i:
            out.append(tok.eos_token_id)
        out.extend(tok.encode(d, add_special_tokens=False))
    return out


def test_sequences_are_consecutive_pieces_of_the_document_stream(tok, tiny_corpus_jsonl):
    rows = load_corpus(str(tiny_corpus_jsonl), tok, n_sequences=30, seq_len=40, seed=3)
    assert rows.dtype == torch.long and rows.shape == (30, 40)
    assert (rows[:, 0] == tok.bos_token_id).all()
    docs = list(iter_documents(str(tiny_corpus_jsonl), seed=3))
    want = _stream(tok, docs)[: 30 * 39]
    assert rows[:, 1:].flatten().tolist() == want


def test_document_order_is_a_seeded_permutation(tiny_corpus_jsonl, tok):
    in_file = [json.loads(line)["text"] for line in tiny_corpus_jsonl.read_text().splitlines()]
    a = list(iter_documents(str(tiny_corpus_jsonl), seed=0))
    assert sorted(a) == sorted(in_file)
    assert a == list(iter_documents(str(tiny_corpus_jsonl), seed=0))
    assert a != list(iter_documents(str(tiny_corpus_jsonl), seed=1))
    x0 = load_corpus(str(tiny_corpus_jsonl), tok, 10, 32, seed=0)
    assert torch.equal(x0, load_corpus(str(tiny_corpus_jsonl), tok, 10, 32, seed=0))
    assert not torch.equal(x0, load_corpus(str(tiny_corpus_jsonl), tok, 10, 32, seed=1))


def test_txt_paragraphs_are_documents(tmp_path, tok):
    paras = ["First paragraph,\nwith two lines.", "Second one.", "Third: the end of it all, really."]
    (tmp_path / "c.txt").write_text("\n\n".join(paras) + "\n")
    assert sorted(d.strip() for d in iter_documents(str(tmp_path / "c.txt"))) == sorted(paras)


def test_folder_of_mixed_files(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"body": "alpha document text"}) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.csv").write_text("body,other\nbeta document text,1\n")
    pq.write_table(pa.table({"body": ["gamma document text"]}), tmp_path / "c.parquet")
    (tmp_path / "notes.md").write_text("ignored")
    docs = list(iter_documents(str(tmp_path), text_column="body"))
    assert sorted(docs) == ["alpha document text", "beta document text", "gamma document text"]
    rows = load_corpus(str(tmp_path), tok, 1, 6, text_column="body")
    assert rows.shape == (1, 6)


def test_short_and_empty_corpora(tmp_path, tok, capsys):
    (tmp_path / "short.txt").write_text("only a few words here\n")
    (doc,) = iter_documents(str(tmp_path / "short.txt"))
    n_tokens = len(tok.encode(doc, add_special_tokens=False))
    with pytest.raises(AtlasError, match="corpus too short.*--seq-len.*--dataset"):
        load_corpus(str(tmp_path / "short.txt"), tok, 4, n_tokens + 2)
    rows = load_corpus(str(tmp_path / "short.txt"), tok, 100, 3)
    assert rows.shape == (n_tokens // 2, 3)
    assert "only" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(AtlasError, match="empty"):
        load_corpus(str(tmp_path / "empty.txt"), tok, 4, 8)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(AtlasError, match="--dataset"):
        load_corpus(str(tmp_path / "empty_dir"), tok, 4, 8)


def test_wrong_column_and_unreachable_hub(tmp_path, tok, monkeypatch):
    (tmp_path / "c.jsonl").write_text(json.dumps({"content": "some text"}) + "\n")
    with pytest.raises(AtlasError, match="content.*--text-column"):
        load_corpus(str(tmp_path / "c.jsonl"), tok, 1, 4)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(AtlasError, match="local .txt"):
        load_corpus("someone/some-unknown-dataset", tok, 1, 4)


def test_default_is_the_demo_corpora(tmp_path, tok, monkeypatch):
    import atlas.demo
    from atlas.corpus import load_corpora

    (tmp_path / "en.txt").write_text("the demo corpus says hello to everyone here\n")
    (tmp_path / "py.txt").write_text("def hello(): return everyone + here\n")
    monkeypatch.setattr(atlas.demo, "DEMO_CORPORA", {"english": tmp_path / "en.txt", "python": tmp_path / "py.txt"})
    split = load_corpora(None, tok, 2, 5)
    assert [c["name"] for c in split.corpora] == ["english", "python"]
    assert tok.decode(split.tokens[0, 1:]).startswith("the demo")
    assert tok.decode(split.tokens[1, 1:]).startswith("def he")


def test_tokenizer_without_bos(tmp_path, tok):
    from transformers import PreTrainedTokenizerFast

    no_bos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<eos>")
    assert no_bos.bos_token_id is None
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one two", "three four"]))
    rows = load_corpus(str(tmp_path / "c.jsonl"), no_bos, 100, 2)
    docs = list(iter_documents(str(tmp_path / "c.jsonl")))
    want = _stream(no_bos, docs)
    assert rows.flatten().tolist() == want[: len(want) // 2 * 2]


def _datasets_rows(builder, files, **kwargs):
    import datasets

    return list(datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs))


def test_plain_readers_give_the_rows_datasets_gives(tmp_path):
    """.txt and .jsonl are read without ``datasets``: the rows (and so the documents) are the ones its
    text (sample_by="paragraph") and json builders give, on files with the awkward cases."""
    import atlas.corpus as corpus

    txt = tmp_path / "a.txt"
    txt.write_bytes("first\r\nparagraph\r\n\r\nsecond é\n\n\n\nthird\n\n \n\nlast line\n".encode())
    txt2 = tmp_path / "b.txt"
    txt2.write_text("\n\nlead blank\n\nend without newline")
    files = [str(txt), str(txt2)]
    assert list(corpus._plain_rows("text", files, "x")) == _datasets_rows("text", files, sample_by="paragraph")

    jl = tmp_path / "c.jsonl"
    rows = [{"text": "one", "id": 1}, {"text": "two\n\nlines ü", "id": 2}, {"text": "", "id": 3},
            {"text": "  ", "id": 4}, {"text": "five", "id": 5}]
    jl.write_text("\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + "\n\n")
    assert list(corpus._plain_rows("json", [str(jl)], "x")) == _datasets_rows("json", [str(jl)])
    assert corpus._plain_rows("json", [str(jl), str(tmp_path / "d.json")], "x") is None  # .json: datasets


def test_plain_readers_name_a_bad_jsonl_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(AtlasError, match=r"line 2 of .*bad.jsonl is not JSON"):
        list(iter_documents(str(bad)))
    bad.write_text('{"text": "ok"}\n["text"]\n')
    with pytest.raises(AtlasError, match=r"line 2 of .*bad.jsonl is not a JSON object"):
        list(iter_documents(str(bad)))


def test_rows_without_the_text_column_are_skipped(tmp_path):
    """As with ``datasets`` (which gives a missing key as None), a row lacking the column is skipped;
    only a corpus where no row has it is refused."""
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "hello world"}\n{"meta": 1}\n{"text": "second doc"}\n')
    assert sorted(iter_documents(str(mixed))) == ["hello world", "second doc"]
    none = tmp_path / "none.jsonl"
    none.write_text('{"meta": 1}\n{"body": "x", "meta": 2}\n')
    with pytest.raises(AtlasError, match=r"no column 'text' \(columns: body, meta\).*--text-column"):
        list(iter_documents(str(none)))


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_a_file_that_is_not_utf8_is_named(tmp_path, name):
    path = tmp_path / name
    text = "caf\u00e9 au lait" if name.endswith(".txt") else json.dumps({"text": "caf\u00e9"}, ensure_ascii=False)
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(AtlasError, match=rf"{name} is not UTF-8 text .*convert it to UTF-8"):
        list(iter_documents(str(path)))


def test_reading_txt_and_jsonl_does_not_import_datasets(tmp_path):
    import subprocess
    import sys

    (tmp_path / "c.jsonl").write_text('{"text": "hello"}\n')
    (tmp_path / "d.txt").write_text("world\n\nagain\n")
    code = ("import sys; from atlas.corpus import iter_documents; "
            f"docs = sorted(iter_documents({str(tmp_path)!r})); "
            "print(docs, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['again\\n', 'hello', 'world'] False"
