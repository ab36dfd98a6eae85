import json

import numpy as np
import pytest

from jaxgpt.cli.main import main
from jaxgpt.data.corpus import DataError, open_token_file
from jaxgpt.data.prepare import NearDuplicateIndex, clean_text, prepare
from jaxgpt.data.tokenizer import GPT2Tokenizer
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.batches import build_data

STORY = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old red barn "
         "and the children play by the river until the sun goes down behind the hills")


def test_clean_text_normalises_and_strips_controls():
    assert clean_text("Cafe\u0301\r\nline\x00two\x07\tx ") == "Caf\u00e9\nlinetwo\tx"


def test_near_duplicate_index():
    idx = NearDuplicateIndex(threshold=0.8)
    words = np.random.default_rng(1).choice(STORY.split(), 200).tolist()
    assert not idx.seen(" ".join(words))
    words[100] = "sleepy"  # one word of 200 changed: about 5 of 196 shingles differ, Jaccard ~0.95
    assert idx.seen(" ".join(words))
    assert not idx.seen("an entirely different text about sailing ships and the open sea at dawn " * 2)


def test_prepare_dedups_splits_and_trains(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    words = STORY.split()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(" ".join(rng.choice(words, 60)))
    (docs / "dup.txt").write_text((docs / "03.txt").read_text())  # exact duplicate
    (docs / "near.txt").write_text((docs / "05.txt").read_text() + " end")  # near duplicate
    (docs / "empty.txt").write_text(" \x00 \n")
    records = [{"text": STORY + f" number {i}" * 3} for i in range(3)]
    (docs / "more.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    assert main(["data", "prepare", str(docs), "--out", str(tmp_path / "prep"), "--val-fraction", "0.2",
                 "--no-progress", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["documents_in"] == 46
    assert stats["exact_duplicates"] == 1 and stats["near_duplicates"] >= 1 and stats["empty"] == 1
    assert stats["train_documents"] + stats["val_documents"] == stats["documents_kept"]
    assert stats["val_documents"] > 0 and stats["split"] == "by document"
    train_ids = open_token_file(tmp_path / "prep" / "train.bin")
    assert train_ids.dtype == np.dtype("<u2") and train_ids.size == stats["train_tokens"]
    eot = GPT2Tokenizer().eot_id
    assert int(np.sum(np.asarray(train_ids) == eot)) == stats["train_documents"]

    data = build_data(TrainConfig(data=str(tmp_path / "prep"), batch_size=2), seq_len=16)
    x, y = data.train_source.batch(0)
    assert x.shape == (2, 16) and data.tokenizer.vocab_size == 50257


def test_prepare_single_document_splits_by_tokens_and_bad_input(tmp_path):
    (tmp_path / "one.txt").write_text(STORY * 5)
    stats = prepare([str(tmp_path / "one.txt")], tmp_path / "out", tokenizer_name="char", progress=False)
    assert stats["val_tokens"] > 0 and "by tokens" in stats["split"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        prepare([str(tmp_path / "bad.jsonl")], tmp_path / "out2", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare([str(tmp_path / "missing")], tmp_path / "out3", progress=False)


def test_prepare_refuses_a_non_empty_output_and_an_interrupted_rebuild_keeps_the_old_corpus(tmp_path, monkeypatch):
    src = tmp_path / "docs.txt"
    src.write_text("one document here\n\nanother document there\n\na third one\n")
    out = tmp_path / "prepared"
    prepare([str(src)], out, tokenizer_name="char", progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="not empty"):
        prepare([str(src)], out, tokenizer_name="char", progress=False)
    import jaxgpt.data.prepare as prep

    def dies(*a, **k):  # the rebuild is interrupted half-way (as by kill -9 or Ctrl-C)
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "clean_text", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare([str(src)], out, tokenizer_name="char", progress=False, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no half-written folder left
    monkeypatch.undo()
    prepare([str(src)], out, tokenizer_name="gpt2", progress=False, force=True)  # replaced whole
    assert json.loads((out / "meta.json").read_text())["tokenizer"]["kind"] == "gpt2"
