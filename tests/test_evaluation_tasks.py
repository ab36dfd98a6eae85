"""`jaxgpt evaluate`: each task kind on a model whose answer is known (uniform next-token
probabilities: every token costs exactly log V), batched scoring against the plain forward pass,
generation against the decoder, task files and their errors."""

import json
import math
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt.cli.main import main
from jaxgpt.config import get_preset
from jaxgpt.data.corpus import DataError
from jaxgpt.data.tokenizer import CharTokenizer
from jaxgpt.evaluation.scoring import Scorer
from jaxgpt.evaluation.tasks import check_task, evaluate_tasks, load_task
from jaxgpt.inference.generate import Decoder
from jaxgpt.nn.model import GPT, init_params

TOK = CharTokenizer(list(string.ascii_lowercase + " .?:"))  # 30 characters + end-of-text: V = 31


@pytest.fixture(scope="module")
def model():
    config = get_preset("test", vocab_size=TOK.vocab_size, context_length=32)
    return init_params(config, 0), config


@pytest.fixture(scope="module")
def uniform(model):
    params, config = model
    zero_head = jax.tree.map(lambda a: a, params)
    zero_head["params"]["lm_head"]["kernel"] = jnp.zeros_like(params["params"]["lm_head"]["kernel"])
    return zero_head, config  # logits all 0: p(token) = 1/V whatever came before


def test_every_kind_on_the_uniform_model(uniform):
    v = TOK.vocab_size
    docs = ["the cat sat on the mat. " * 5, "a dog ran far away.", "q"]  # the first is longer than the context
    mc = [{"q": "is it?", "choices": [" yes", " no"], "gold": 1},  # " no" has fewer tokens: the higher log-likelihood
          {"q": "which?", "choices": [" ab", " abcd", " abc"], "gold": 0}]
    specs = [check_task({"name": "ppl", "kind": "perplexity", "text": "text", "examples": [{"text": d} for d in docs]}),
             check_task({"name": "mc", "kind": "multiple_choice", "context": "{q}", "choices": "choices", "gold": "gold",
                         "examples": mc}),
             check_task({"name": "cloze", "kind": "cloze", "text": "text", "examples": [{"text": "the cat sat"}]})]
    report = evaluate_tasks(*uniform, TOK, specs, batch_size=2)["tasks"]
    n_tokens, n_bytes = sum(len(d) for d in docs), sum(len(d.encode()) for d in docs)
    assert report["ppl"]["token_perplexity"] == pytest.approx(v, rel=1e-5)  # every token scored exactly once
    assert report["ppl"]["tokens"] == n_tokens
    assert report["ppl"]["bits_per_byte"] == pytest.approx(n_tokens * math.log2(v) / n_bytes, rel=1e-5)
    assert report["mc"]["acc"] == 1.0
    assert report["cloze"]["perplexity"] == pytest.approx(v, rel=1e-5)
    assert report["cloze"]["acc"] == 0.0  # the greedy token is id 0 (" "), never " sat"


def test_acc_norm_divides_by_the_choice_bytes():
    from jaxgpt.evaluation.tasks import run_multiple_choice

    class Fixed:  # log-likelihoods by continuation: " a" −3 (2 bytes), " bbbb" −5 (5 bytes)
        tokenizer = TOK

        def loglikelihood(self, requests):
            return [({2: -3.0, 5: -5.0}[len(c)], False) for _, c in requests]

    spec = {"name": "t", "context": "{q}", "choices": "c", "gold": "g"}
    rows = [{"q": "?", "c": [" a", " bbbb"], "g": 1}]
    assert run_multiple_choice(Fixed(), spec, rows) == {"acc": 0.0, "acc_norm": 1.0}  # −3 > −5, but −1/byte > −1.5/byte


def test_batched_scores_equal_the_plain_forward_pass(model):
    params, config = model
    scorer = Scorer(params, config, TOK, batch_size=3)
    requests = [(TOK.encode("the cat"), TOK.encode(" sat")), (TOK.encode("a"), TOK.encode(" dog ran")),
                (TOK.encode("x" * 40), TOK.encode(" y"))]  # the last is cut from the left to the context
    got = scorer.loglikelihood(requests)
    for (context, continuation), (lp, greedy) in zip(requests, got):
        tokens = (context + continuation)[-(config.context_length + 1):]
        logp = jax.nn.log_softmax(GPT(config).apply(params, jnp.asarray([tokens[:-1]])), axis=-1)[0]
        n = len(continuation)
        positions = range(len(tokens) - 1 - n, len(tokens) - 1)
        assert lp == pytest.approx(sum(float(logp[i, tokens[i + 1]]) for i in positions), abs=1e-4)
        assert greedy == all(int(jnp.argmax(logp[i])) == tokens[i + 1] for i in positions)


def test_generation_equals_the_decoder_and_scores_itself_perfectly(model):
    params, config = model
    prompts = ["the cat", "a dog ran"]
    expected = [TOK.decode(row) for row in Decoder(params, config).generate_batch([TOK.encode(p) for p in prompts], 6,
                                                                                  eos_id=TOK.eot_id)]
    spec = check_task({"name": "gen", "kind": "generate", "prompt": "{p}", "target": "t", "max_new_tokens": 6,
                       "stop": [], "metrics": ["exact_match", "rouge", "bleu", "chrf"],
                       "examples": [{"p": p, "t": e} for p, e in zip(prompts, expected)]})
    result = evaluate_tasks(params, config, TOK, [spec], batch_size=2)["tasks"]["gen"]
    assert [s["prediction"] for s in result["samples"]] == expected
    assert result["exact_match"] == 1.0 and result["chrf"] == pytest.approx(100.0)


def test_task_files_and_their_errors(tmp_path, capsys):
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["hello there world", "good day to you"]))
    (tmp_path / "task.yaml").write_text("kind: cloze\ntext: text\ndata: data.jsonl\n")
    assert load_task(str(tmp_path / "task.yaml"))["name"] == "task"
    assert main(["evaluate", "--preset", "test", "--tasks", str(tmp_path / "task.yaml"), "--json",
                 "--out", str(tmp_path / "report.json")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"]["task"]["n"] == 2 and report == json.loads((tmp_path / "report.json").read_text())
    (tmp_path / "bad.yaml").write_text("kind: multiple_choice\ndata: data.jsonl\ncontext: '{text}'\n")
    with pytest.raises(DataError, match=r"lacks \['choices', 'gold'\]"):
        load_task(str(tmp_path / "bad.yaml"))
    with pytest.raises(DataError, match="kind must be one of"):
        check_task({"name": "x", "kind": "essay", "examples": [{}]})
    with pytest.raises(DataError, match="neither a built-in task"):
        load_task("no-such-task")
    (tmp_path / "broken.jsonl").write_text('{"text": "a b"}\nnot json\n')
    (tmp_path / "broken.yaml").write_text("kind: perplexity\ntext: text\ndata: broken.jsonl\n")
    with pytest.raises(DataError, match="broken.jsonl:2"):
        load_task(str(tmp_path / "broken.yaml"))


def test_builtin_tasks_read_the_shared_data(shared_data_dir):
    for name, kind in [("sms-spam", "multiple_choice"), ("the-verdict-cloze", "cloze"),
                       ("tinyshakespeare-ppl", "perplexity"), ("instruction-gen", "generate")]:
        spec = load_task(name)
        assert spec["kind"] == kind and len(spec["examples"]) >= 10, name
    assert np.mean([e["gold"] for e in load_task("sms-spam")["examples"]]) > 0.05  # both labels present


def test_tasks_scored_during_training(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat and the dog ran far away " * 60)
    (tmp_path / "data.jsonl").write_text(json.dumps({"text": "the cat sat on the mat"}) + "\n")
    (tmp_path / "cloze.yaml").write_text("kind: cloze\ntext: text\ndata: data.jsonl\n")
    assert main(["train", "--data", str(corpus), "--tokenizer", "char", "--preset", "test", "--max-steps", "3",
                 "--out", str(tmp_path / "run"), "--no-progress", "--set", "train.batch_size=2",
                 "--set", "train.eval_every=3", "--set", "train.eval_batches=1", "--set", "train.samples=0",
                 "--set", f"train.eval_tasks={tmp_path / 'cloze.yaml'}", "--set", "train.eval_tasks_every=2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tasks = [r for r in records if r["kind"] == "tasks"]
    assert [r["step"] for r in tasks] == [2, 3] and all(0 <= r["cloze/acc"] <= 1 and r["cloze/perplexity"] > 1
                                                        for r in tasks)
    assert (tmp_path / "run" / "loss.png").is_file()


@pytest.mark.parametrize("kind, fields, row, message", [
    ("multiple_choice", dict(context="{q}", choices="choices", gold="gold"), {"q": "x", "choices": [" a", " b"], "gold": 7},
     r"field 'gold' must be the index of the right choice \(0…1\), got 7"),
    ("multiple_choice", dict(context="{q}", choices="choices", gold="gold"), {"q": "x", "choices": [" a", " b"], "gold": -1},
     "field .gold.* got -1"),
    ("multiple_choice", dict(context="{q}", choices="choices", gold="gold"), {"q": "x", "choices": [" a", " b"], "gold": True},
     "field .gold.* got True"),
    ("multiple_choice", dict(context="{q}", choices="choices", gold="gold"), {"q": "x", "choices": "blue", "gold": 0},
     "field 'choices' must be a list of at least two non-empty strings, got 'blue'"),
    ("multiple_choice", dict(context="{q}", choices="choices", gold="gold"), {"q": "x", "choices": [" a", " b"]},
     "lacks the field 'gold'"),
    ("perplexity", dict(text="text"), {"text": ""}, "field 'text' must be a non-empty string"),
    ("cloze", dict(text="text"), {"text": None}, "field 'text' must be a non-empty string"),
    ("generate", dict(prompt="{q}", target="answer"), {"q": "x"}, "lacks the field 'answer'"),
])
def test_malformed_examples_are_refused_by_example_and_field(uniform, kind, fields, row, message):
    good = {"multiple_choice": {"q": "y", "choices": [" a", " b"], "gold": 0}, "perplexity": {"text": "a b"},
            "cloze": {"text": "a b"}, "generate": {"q": "y", "answer": "a"}}[kind]
    spec = check_task({"name": "t", "kind": kind, **fields, "examples": [good, row]})
    with pytest.raises(DataError, match=f"task 't': example 2 {message}"):
        evaluate_tasks(*uniform, TOK, [spec])


def test_a_limit_must_be_positive(tmp_path, capsys):
    with pytest.raises(DataError, match="limit must be a positive number"):
        check_task({"name": "t", "kind": "perplexity", "text": "text", "examples": [{"text": "a"}], "limit": -1})
    assert main(["evaluate", "--preset", "test", "--tasks", "x.yaml", "--limit", "-1"]) == 2
    assert "--limit must be a positive number" in capsys.readouterr().err


def test_a_nan_model_is_an_error_not_a_score(uniform):
    params, config = uniform
    nan = jax.tree.map(lambda p: p * jnp.nan, params)
    spec = check_task({"name": "ppl", "kind": "perplexity", "text": "text", "examples": [{"text": "a cat"}]})
    with pytest.raises(FloatingPointError, match="token_perplexity, byte_perplexity, bits_per_byte is NaN"):
        evaluate_tasks(nan, config, TOK, [spec])
