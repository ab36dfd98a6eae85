"""Instruction finetuning: the book's prompt format, split and collate; scores; the LLM judge; the CLI."""

import json
import string
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import jax
import numpy as np
import pytest

from jaxgpt.cli.main import main
from jaxgpt.config import get_preset
from jaxgpt.finetune.instruct import (book_split, collate, extract_response, format_example, format_input, judge,
                             judge_prompt, load_instruction_data, rouge_l, score_responses)
from jaxgpt.nn.model import GPT, init_params
from jaxgpt.finetune.prompting import build_prompt, label_scores, pick_examples
from jaxgpt.data.tokenizer import CharTokenizer


def test_alpaca_format_is_the_books():
    entry = {"instruction": "Identify the correct spelling of the following word.", "input": "Ocassion",
             "output": "The correct spelling is 'Occasion.'"}
    assert format_input(entry) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion")
    assert format_example(entry).endswith("\n\n### Response:\nThe correct spelling is 'Occasion.'")
    assert "### Input" not in format_input({**entry, "input": ""})
    assert extract_response(format_input(entry) + "\n\n### Response:\n  Occasion  ") == "Occasion"


def test_book_split(shared_data_dir):
    data = load_instruction_data(shared_data_dir / "instruction-data.json")
    train, val, test = book_split(data)
    assert (len(train), len(val), len(test)) == (935, 55, 110)
    assert test[0] == data[935] and val[0] == data[1045]


def test_collate_matches_the_books_example():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], 50256)
    np.testing.assert_array_equal(inputs, [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]])
    np.testing.assert_array_equal(targets, [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100],
                                            [8, 9, 50256, -100, -100]])
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], 50256, allowed_max_length=3,
                              prompt_lengths=[3, 1, 2])
    np.testing.assert_array_equal(inputs, [[0, 1, 2], [5, 6, 50256], [7, 8, 9]])
    # prompt tokens are not targets: row 0's prompt is tokens 0..2, so targets 1 and 2 are ignored
    np.testing.assert_array_equal(targets, [[-100, -100, 3], [6, 50256, -100], [-100, 9, 50256]])
    # padding to a multiple adds ignored targets only
    wide_x, wide_y = collate([[0, 1, 2, 3, 4], [5, 6]], 50256, pad_to_multiple=8)
    assert wide_x.shape == (2, 8) and (wide_y[:, 5:] == -100).all()


def test_overlap_scores():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("a b c", "x y z") == 0.0
    # LCS("the cat sat", "the black cat sat down") = 3: P = 1, R = 3/5
    assert rouge_l("the cat sat", "the black cat sat down") == pytest.approx(2 * 0.6 / 1.6)
    scores = score_responses([{"output": "Paris.", "model_response": "paris"},
                              {"output": "It is 5.", "model_response": "4"}])
    assert scores == {"n": 2, "exact_match": 0.5, "rouge_l_f1": 0.5}


class _OllamaHandler(BaseHTTPRequestHandler):
    """Speaks Ollama's /api/chat: streamed JSON lines, the last with "done": true."""

    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append((self.path, body))
        reply = "87" if "Paris" in body["messages"][0]["content"] else "I cannot say"
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.end_headers()
        for piece in (reply[:1], reply[1:]):
            self.wfile.write((json.dumps({"message": {"role": "assistant", "content": piece}, "done": False}) + "\n").encode())
        self.wfile.write((json.dumps({"message": {"role": "assistant", "content": ""}, "done": True}) + "\n").encode())

    def log_message(self, *args):
        pass


def test_llm_judge_against_a_local_ollama_compatible_server():
    server = HTTPServer(("127.0.0.1", 0), _OllamaHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        entries = [{"instruction": "Capital of France?", "input": "", "output": "Paris", "model_response": "Paris"},
                   {"instruction": "Say hi", "input": "", "output": "Hi", "model_response": "Hello"}]
        result = judge(entries, f"http://127.0.0.1:{server.server_port}", model="tester")
    finally:
        server.shutdown()
    assert result == {"n": 2, "scored": 1, "unparsed": 1, "mean_score": 87.0, "scores": [87]}
    path, body = _OllamaHandler.requests[0]
    assert path == "/api/chat" and body["model"] == "tester"
    assert body["messages"][0]["content"] == judge_prompt(entries[0])
    assert "on a scale from 0 to 100" in judge_prompt(entries[0])


def test_prompting_scores_are_label_log_probabilities():
    tok = CharTokenizer.from_text(string.printable)
    config = get_preset("test", vocab_size=tok.vocab_size, context_length=64)
    params = init_params(config)
    prompt = "Message: hi\nLabel:"
    scores = label_scores(params, config, tok, [prompt], ["ab", "c"])
    logp = np.asarray(jax.nn.log_softmax(GPT(config).apply(params, np.array([tok.encode(prompt + " ab")]))))[0]
    ids = tok.encode(prompt + " ab")
    expected = sum(logp[i - 1, ids[i]] for i in range(len(ids) - 3, len(ids)))  # " ", "a", "b"
    assert scores[0, 0] == pytest.approx(expected, rel=1e-5)
    examples = pick_examples([("x", "ham")] * 5 + [("y", "spam")] * 5, 4, ["ham", "spam"], seed=0)
    assert sorted(label for _, label in examples) == ["ham", "ham", "spam", "spam"]
    assert build_prompt("q", examples[:1], ["ham", "spam"]).startswith("Classify each text message as ham or spam.")


def test_cli_finetune_classify_instruct_and_classify(tmp_path, capsys):
    """The commands end to end on a random 'test' model (seconds): files written, models reload."""
    base = ["--preset", "test", "--epochs", "1", "--no-progress", "--json"]
    assert main(["finetune", "classify", *base, "--out", str(tmp_path / "cls"), "--max-length", "16",
                 "--trainable", "lora", "--lora-rank", "2", "--prompt-shots", "0"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == {"train": 1045, "val": 149, "test": 300} and "0" in result["prompting"]
    assert main(["classify", "--checkpoint", str(tmp_path / "cls"), "--json", "Win cash now", "hi mum"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["Win cash now", "hi mum"] and rows[0]["label"] in ("ham", "spam")

    assert main(["finetune", "instruct", *base, "--out", str(tmp_path / "ins"), "--limit", "16",
                 "--max-new-tokens", "4", "--mask-prompt"]) == 0
    result = json.loads(capsys.readouterr().out)
    responses = json.loads((tmp_path / "ins" / "test-responses.json").read_text())
    assert len(responses) == result["examples"]["test"] == 1 and "model_response" in responses[0]
    assert main(["generate", "--checkpoint", str(tmp_path / "ins" / "model"), "--prompt", "Hi",
                 "--max-new-tokens", "2", "--json"]) == 0
    assert main(["finetune", "classify", "--preset", "test", "--trainable", "lora", "--lora-targets", "bogus"]) == 2
    assert "LoRA targets" in capsys.readouterr().err
