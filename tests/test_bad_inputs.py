"""Bad inputs and faults, as a hostile tester and a careless new user would try them.

Every case asserts: a non-zero exit (or a 4xx answer), a message that names the problem, no
traceback, and that no file that existed before was changed or lost. The CLI runs in-process
(`jaxgpt.cli.main.main`) on small shared fixtures: one trained run, copies of it damaged on
purpose, a Hugging Face export, a prepared corpus.
"""

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import running_server
from jaxgpt.cli.main import main
from jaxgpt.config import get_preset
from jaxgpt.data.corpus import write_token_file
from jaxgpt.data.prepare import prepare
from jaxgpt.data.tokenizer import CharTokenizer
from jaxgpt.nn.model import init_params
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.loop import train
from jaxgpt.train.run_dir import save_for_inference

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 40


def _flip_newest_arrays(run: Path) -> None:
    """Flip a few bytes in the largest array file of every saved step (what a bad disk does)."""
    for step_dir in [*run.glob("checkpoints/*"), *run.glob("best/*")]:
        files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
        target = max(files, key=lambda p: p.stat().st_size)
        data = bytearray(target.read_bytes())
        for i in (7, 11, 13):
            data[len(data) // 2 + i] ^= 0xFF
        target.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """The workspace every case runs against (built once)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "corpus.txt").write_text(TEXT)
    (root / "tiny.txt").write_text("too short")
    cfg = TrainConfig(data=str(root / "corpus.txt"), tokenizer="char", max_steps=2, batch_size=4, eval_every=2,
                      eval_batches=2, ckpt_every=2, samples=0, peak_flops=1e9, log_every=1)
    train(get_preset("test", drop_rate=0.0), cfg, root / "run", progress=False)
    shutil.copytree(root / "run", root / "corrupt")
    _flip_newest_arrays(root / "corrupt")
    shutil.copy(root / "corpus.txt", root / "corpus2.txt")
    train(get_preset("test", drop_rate=0.0), cfg.replace(data=str(root / "corpus2.txt")), root / "run2", progress=False)
    (root / "corpus2.txt").write_text(TEXT + "a lazy fox")  # the corpus changed after run2 started

    tok = CharTokenizer.from_text(TEXT)
    rope = get_preset("test", position="rope", vocab_size=tok.vocab_size)
    save_for_inference(init_params(rope), rope, tok, root / "rope_run")
    small = get_preset("test", vocab_size=tok.vocab_size)
    save_for_inference(jax.tree.map(lambda p: p * np.nan, init_params(small)), small, tok, root / "nan_run")  # sealed NaNs
    for name, record in {"unsealed": None, "null_record": {"version": 1, "files": None},
                         "null_entries": {"version": 1, "files": {"state/d": None}}}.items():
        shutil.copytree(root / "run", root / name)
        for manifest in (root / name).glob("*/*/integrity.json"):
            manifest.unlink() if record is None else manifest.write_text(json.dumps(record))
    (root / "latin1.txt").write_bytes("un café au lait ".encode("latin-1") * 20)
    (root / "prefs.json").write_text(json.dumps([{"instruction": "the fox", "input": "", "output": "a dog",
                                                  "chosen": "a dog", "rejected": "the box"}] * 4))
    assert main(["convert", "to-hf", str(root / "run"), "--out", str(root / "hf")]) == 0
    for name, change in {"hf_absurd": {"n_layer": 1_000_000_000}, "hf_badjson": None}.items():
        shutil.copytree(root / "hf", root / name)
        path = root / name / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}) if change else "{not json")
    shutil.copytree(root / "hf", root / "hf_garbage")
    (root / "hf_garbage" / "model.safetensors").write_bytes(b"\x00" * 64)
    (root / "hf_noconfig").mkdir()
    (root / "nonempty").mkdir()
    (root / "nonempty" / "keep.txt").write_text("precious")
    (root / "empty_run" / "checkpoints").mkdir(parents=True)

    prepare([str(root / "corpus.txt")], root / "prepared", tokenizer_name="char", progress=False)
    shutil.copytree(root / "prepared", root / "prepared_badids")
    write_token_file(np.full(500, 9000), root / "prepared_badids" / "train.bin", 10_000)  # ids beyond the vocab

    (root / "no_label.csv").write_text("text,label\nhello there,ham\nbuy now,\n")
    (root / "labels.txt").write_text("not a supported format")
    (root / "wrong_types.json").write_text(json.dumps([{"instruction": "add", "output": 3}]))
    (root / "object.json").write_text(json.dumps({"instruction": "x", "output": "y"}))
    (root / "badjson.json").write_text("[{")
    return {"root": root}


def _snapshot(root: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


R = "{root}"
CASES = [  # (name, argv with {root}, what the message must say)
    ("nan learning rate", ["train", "--out", f"{R}/o1", "--set", "train.lr=nan"], "finite"),
    ("zero layers", ["train", "--out", f"{R}/o2", "--set", "model.n_layers=0"], "n_layers"),
    ("zero batch", ["train", "--out", f"{R}/o3", "--set", "train.batch_size=0"], "batch_size"),
    ("unknown section", ["train", "--out", f"{R}/o4", "--set", "foo.bar=1"], "section"),
    ("unknown field", ["train", "--out", f"{R}/o5", "--set", "model.nope=1"], "no field 'nope'"),
    ("not a number", ["train", "--out", f"{R}/o6", "--set", "train.lr=fast"], "cannot read 'fast'"),
    ("missing corpus", ["train", "--out", f"{R}/o7", "--data", f"{R}/nowhere.txt"], "neither a named corpus"),
    ("corpus shorter than context", ["train", "--out", f"{R}/o8", "--data", f"{R}/tiny.txt", "--tokenizer", "char"],
     "too few"),
    ("context beyond the model", ["train", "--out", f"{R}/o9", "--set", "train.context_length=100000"], "exceeds"),
    ("run exists", ["train", "--out", f"{R}/run", "--data", f"{R}/corpus.txt"], "already holds checkpoints"),
    ("resume nothing", ["train", "--out", f"{R}/empty_run", "--resume"], "no checkpoint found"),
    ("resume with another lr", ["train", "--out", f"{R}/run", "--resume", "--set", "train.lr=0.5"],
     "cannot resume with different"),
    ("resume on a changed corpus", ["train", "--out", f"{R}/run2", "--resume", "--max-steps", "4"], "changed since"),
    ("resume with another model", ["train", "--out", f"{R}/run", "--resume", "--set", "model.n_layers=3"],
     "n_layers: checkpoint 2 vs requested 3"),
    ("mesh larger than the machine", ["train", "--out", f"{R}/o10", "--mesh", "data=64"], "needs 64 devices"),
    ("ids beyond the vocabulary", ["train", "--out", f"{R}/o11", "--data", f"{R}/prepared_badids"],
     "outside the vocabulary"),
    ("resume below the run's step", ["train", "--out", f"{R}/run", "--resume", "--max-steps", "1"],
     "--max-steps 1 is below this run's step 2"),
    ("resume a finished run", ["train", "--out", f"{R}/run", "--resume"], "already reached step 2"),
    ("eval nowhere", ["eval", "--checkpoint", f"{R}/nowhere"], "no such checkpoint path"),
    ("eval a step whose integrity record was deleted", ["eval", "--checkpoint", f"{R}/unsealed"],
     "integrity record integrity.json is missing"),
    ("eval a step whose integrity record lists no files", ["eval", "--checkpoint", f"{R}/null_record"], "malformed"),
    ("eval a step whose integrity record has null entries", ["eval", "--checkpoint", f"{R}/null_entries"],
     "malformed"),
    ("eval weights that hold NaN", ["eval", "--checkpoint", f"{R}/nan_run", "--data", f"{R}/corpus.txt"],
     "holds NaN or inf in 27 of 27 tensors"),
    ("generate from weights that hold NaN", ["generate", "--checkpoint", f"{R}/nan_run", "--prompt", "the"],
     "holds NaN or inf"),
    ("eval a damaged run", ["eval", "--checkpoint", f"{R}/corrupt", "--json"], "corrupt"),
    ("generate from a damaged run", ["generate", "--checkpoint", f"{R}/corrupt", "--prompt", "the"], "corrupt"),
    ("top-p above one", ["generate", "--checkpoint", f"{R}/run", "--prompt", "the", "--top-p", "1.5"], "top_p"),
    ("negative temperature", ["generate", "--checkpoint", f"{R}/run", "--prompt", "the", "--temperature", "-1"],
     "temperature"),
    ("prompt and batch file", ["generate", "--prompt", "a", "--batch-file", f"{R}/corpus.txt"], "exactly one"),
    ("checkpoint and hf", ["generate", "--checkpoint", f"{R}/run", "--hf", f"{R}/hf", "--prompt", "a"], "not both"),
    ("export into a non-empty folder", ["convert", "to-hf", f"{R}/run", "--out", f"{R}/nonempty"], "not empty"),
    ("export a rope model as GPT-2", ["convert", "to-hf", f"{R}/rope_run", "--out", f"{R}/o12"], "position='rope'"),
    ("import without config.json", ["convert", "from-hf", f"{R}/hf_noconfig", "--out", f"{R}/o13"], "config.json"),
    ("import an absurd config", ["convert", "from-hf", f"{R}/hf_absurd", "--out", f"{R}/o14"],
     "n_layer=1000000000 but the weights hold 2 blocks"),
    ("import a config that is not JSON", ["convert", "from-hf", f"{R}/hf_badjson", "--out", f"{R}/o15"],
     "not valid JSON"),
    ("import garbage weights", ["convert", "from-hf", f"{R}/hf_garbage", "--out", f"{R}/o16"],
     "not a readable safetensors"),
    ("import over a run", ["convert", "from-hf", f"{R}/hf", "--out", f"{R}/run"], "already holds checkpoints"),
    ("prepare into a non-empty folder", ["data", "prepare", f"{R}/corpus.txt", "--out", f"{R}/nonempty",
                                         "--tokenizer", "char"], "not empty"),
    ("prepare a device", ["data", "prepare", "/dev/zero", "--out", f"{R}/o21", "--tokenizer", "char"],
     "is not a regular file or a folder"),
    ("tokenizer with a repeated special token", ["tokenizer", "train", f"{R}/corpus.txt", "--vocab-size", "300",
                                                 "--out", f"{R}/o20", "--special", "X", "X"], "must be distinct"),
    ("tokenizer into a non-empty folder", ["tokenizer", "train", f"{R}/corpus.txt", "--vocab-size", "300", "--out",
                                           f"{R}/nonempty"], "not empty"),
    ("tokenizer on bytes that are not UTF-8", ["tokenizer", "train", f"{R}/latin1.txt", "--vocab-size", "300",
                                               "--out", f"{R}/o22"], "not valid UTF-8 at byte 6"),
    ("numerics on an empty batch", ["numerics", "--preset", "test", "--batch", "0"],
     "--batch and --length must be at least 1"),
    ("prepare a bad split", ["data", "prepare", f"{R}/corpus.txt", "--out", f"{R}/o17", "--val-fraction", "2"],
     "val_fraction"),
    ("classify rows without a label", ["finetune", "classify", "--checkpoint", f"{R}/run", "--data",
                                       f"{R}/no_label.csv"], "no 'label' value"),
    ("classify an unknown format", ["finetune", "classify", "--checkpoint", f"{R}/run", "--data",
                                    f"{R}/labels.txt"], "give a .jsonl"),
    ("instructions of the wrong type", ["finetune", "instruct", "--checkpoint", f"{R}/run", "--data",
                                        f"{R}/wrong_types.json"], "'output' is a int, not text"),
    ("dpo with a NaN beta", ["finetune", "dpo", "--checkpoint", f"{R}/run", "--data", f"{R}/prefs.json",
                             "--beta", "nan", "--out", f"{R}/o19"], "beta must be a finite number"),
    ("dpo into the run it starts from", ["finetune", "dpo", "--checkpoint", f"{R}/run", "--data", f"{R}/prefs.json",
                                         "--out", f"{R}/run"], "would write into the model this run starts from"),
    ("instruct into a folder inside its source", ["finetune", "instruct", "--checkpoint", f"{R}/run", "--data",
                                                  f"{R}/prefs.json", "--out", f"{R}/run/sub"], "would write into"),
    ("judge an object", ["judge", f"{R}/object.json"], "expected a non-empty JSON list"),
    ("judge broken JSON", ["judge", f"{R}/badjson.json"], "not valid JSON"),
    ("classify with a pretraining run", ["classify", "--checkpoint", f"{R}/run", "hello"], "not a 'classify'"),
    ("serve on a port that does not exist", ["serve", "--checkpoint", f"{R}/run", "--port", "99999"], "--port"),
    ("serve zero tokens", ["serve", "--checkpoint", f"{R}/run", "--max-tokens-limit", "0"], "--max-tokens-limit"),
    ("plot a folder that is no run", ["plot", f"{R}/nonempty"], "not found"),
    ("attention map of a missing layer", ["attention-map", "--checkpoint", f"{R}/run", "--prompt", "the", "--out",
                                          f"{R}/o18.png", "--layers", "7"], "--layers"),
]


@pytest.mark.parametrize("name, argv, message", CASES, ids=[c[0] for c in CASES])
def test_cli_refuses_clearly_and_loses_nothing(ws, capsys, name, argv, message):
    root = ws["root"]
    before = _snapshot(root)
    code = main([a.replace(R, str(root)) for a in argv])
    out, err = capsys.readouterr()
    assert code not in (0, None), f"{name}: exit {code}\n{out}{err}"
    assert message in err, f"{name}: {err!r}"
    assert "Traceback" not in out + err
    after = _snapshot(root)
    assert {p: h for p, h in after.items() if p in before} == before, f"{name} changed or lost files"


def test_a_damaged_run_resumes_from_its_newest_intact_step(ws, tmp_path, capsys):
    """Only the newest step damaged: resume says so and continues from the one before."""
    run = shutil.copytree(ws["root"] / "run", tmp_path / "run")
    newest = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--no-progress"]) == 0  # step 3 saved
    capsys.readouterr()
    for step_dir in run.glob("*/3"):  # damage step 3 wherever it was saved (periodic and best)
        target = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        target.write_bytes(target.read_bytes()[:-1] + bytes([target.read_bytes()[-1] ^ 1]))
    assert main(["eval", "--checkpoint", str(run)]) == 2
    assert f"the newest intact step is {run / 'checkpoints' / str(newest)}" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "is corrupt" in err and f"using the newest intact step, {run / 'checkpoints' / str(newest)}" in err


def test_a_non_finite_validation_loss_is_an_error_not_a_result(ws):
    """Weights can be finite and still give a NaN loss (here: an infinite scale); `eval`'s
    evaluation refuses it by name instead of printing `val loss nan`."""
    from jaxgpt.train.evaluate import evaluate_model

    tok = CharTokenizer.from_text(TEXT)
    cfg = get_preset("test", vocab_size=tok.vocab_size, drop_rate=0.0)
    params = init_params(cfg)
    params["params"]["ln_f"]["scale"] = params["params"]["ln_f"]["scale"] * np.inf
    train_cfg = TrainConfig(data=str(ws["root"] / "corpus.txt"), tokenizer="char", eval_batches=1, batch_size=2)
    with pytest.raises(FloatingPointError, match="the validation loss of run X on .* is nan"):
        evaluate_model(params, cfg, tok, train_cfg, source="run X")


def test_an_export_onto_a_full_disk_says_so_and_keeps_the_old_one(ws, tmp_path, capsys, monkeypatch):
    import safetensors.numpy
    from safetensors import SafetensorError

    export = shutil.copytree(ws["root"] / "hf", tmp_path / "hf")
    before = _snapshot(export)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    assert main(["convert", "to-hf", str(ws["root"] / "run"), "--out", str(export), "--force"]) == 2
    err = capsys.readouterr().err
    assert "could not write model.safetensors: Error while serializing: IoError(No space left" in err
    assert "Traceback" not in err and _snapshot(export) == before


def test_a_newest_step_missing_files_is_named_not_skipped(ws, tmp_path, capsys):
    """A newest step whose metadata (or integrity record) was removed is an error naming it, never
    silently passed over for an older step; resuming says so and uses the older one."""
    run = shutil.copytree(ws["root"] / "run", tmp_path / "run")
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "3", "--no-progress"]) == 0
    capsys.readouterr()
    older = run / "checkpoints" / "2"
    for step_dir in run.glob("*/3"):
        (step_dir / "_CHECKPOINT_METADATA").unlink()
        shutil.rmtree(step_dir / "meta")
    assert main(["eval", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err
    assert "/3 is corrupt" in err and "_CHECKPOINT_METADATA" in err and f"newest intact step is {older}" in err
    for step_dir in run.glob("*/3"):
        (step_dir / "integrity.json").unlink()  # metadata and record both gone: still not a step to skip
    assert main(["eval", "--checkpoint", str(run)]) == 2
    err = capsys.readouterr().err  # refused for its missing record (older steps have theirs)
    assert "/3 is corrupt (its integrity record integrity.json is missing" in err and f"step is {older}" in err
    assert main(["train", "--out", str(run), "--resume", "--max-steps", "4", "--no-progress"]) == 0
    assert f"using the newest intact step, {older}" in capsys.readouterr().err


def test_a_run_killed_during_its_first_save_starts_afresh(ws, tmp_path, capsys):
    """kill -9 while the first checkpoint is written leaves only Orbax's temporary folder: --resume
    says there is nothing finished and to start afresh; a fresh start is accepted and clears it."""
    run = tmp_path / "run"
    partial = run / "checkpoints" / "2.orbax-checkpoint-tmp-1765000000"
    shutil.copytree(ws["root"] / "run" / "checkpoints" / "2" / "state", partial / "state")
    (partial / "state" / "_METADATA").unlink()  # half written
    data = str(ws["root"] / "corpus.txt")
    argv = ["train", "--out", str(run), "--data", data, "--tokenizer", "char", "--preset", "test", "--max-steps", "2",
            "--set", "train.batch_size=4", "--set", "train.ckpt_every=2", "--set", "train.eval_every=2",
            "--set", "train.eval_batches=2", "--set", "train.samples=0", "--no-progress"]
    assert main([*argv, "--resume"]) == 2
    assert "only unfinished saves" in capsys.readouterr().err
    assert main(argv) == 0
    assert not partial.exists() and (run / "checkpoints" / "2" / "integrity.json").is_file()
    assert main(["eval", "--checkpoint", str(run)]) == 0


# --- HTTP: a real server on a loopback port, serving the character-level run ---------------------

@pytest.fixture(scope="module")
def server(ws):
    pytest.importorskip("uvicorn")
    from jaxgpt.inference.serve import build_app
    from jaxgpt.weights.checkpoint import load_for_inference

    params, config, tokenizer = load_for_inference(ws["root"] / "run")
    app = build_app(params, config, tokenizer, model_name="tiny", max_tokens_limit=8, warmup=False)
    with running_server(app, start_timeout_s=60) as port:
        yield port


def _post(port, raw: bytes, headers=None, chunked=False):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if chunked:
        conn.putrequest("POST", "/v1/completions")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for start in range(0, len(raw), 1 << 16):
            piece = raw[start:start + (1 << 16)]
            try:
                conn.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):  # the server answered and closed early
                break
        else:
            conn.send(b"0\r\n\r\n")
    else:
        conn.request("POST", "/v1/completions", body=raw, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    status, text = resp.status, resp.read().decode()
    conn.close()
    return status, text


BIG = json.dumps({"prompt": "a" * 3_000_000}).encode()
HTTP_CASES = [  # (name, raw body, extra, expected status, what the message must say)
    ("chunked body over the limit", BIG, {"chunked": True}, 413, "exceeds the limit"),
    ("announced body over the limit", BIG, {}, 413, "exceeds the limit"),
    ("not JSON", b"{prompt:", {}, 400, "not valid JSON"),
    ("unknown field", json.dumps({"prompt": "the", "tempreture": 1}).encode(), {}, 400, "unknown field 'tempreture'"),
    ("zero max_tokens", json.dumps({"prompt": "the", "max_tokens": 0}).encode(), {}, 400, "max_tokens"),
    ("more tokens than the server allows", json.dumps({"prompt": "the", "max_tokens": 9}).encode(), {}, 400,
     "max_tokens"),
    ("a character outside the vocabulary", json.dumps({"prompt": "the \u03a9"}).encode(), {}, 400,
     "cannot be encoded"),
    ("a prompt that fills the context", json.dumps({"prompt": "the fox " * 4}).encode(), {}, 400, "context window"),
    ("another model", json.dumps({"prompt": "the", "model": "gpt-5"}).encode(), {}, 404, "not served here"),
    ("five stop strings", json.dumps({"prompt": "the", "stop": list("abcde")}).encode(), {}, 400, "stop"),
    ("temperature out of range", json.dumps({"prompt": "the", "temperature": 7}).encode(), {}, 400, "temperature"),
    ("prompt of the wrong type", json.dumps({"prompt": 12}).encode(), {}, 400, "prompt"),
    ("a foreign Host header (DNS rebinding)", json.dumps({"prompt": "the"}).encode(),
     {"headers": {"Host": "attacker.example:8000"}}, 421, "Host 'attacker.example:8000' is not served here"),
    ("a Host that only starts like localhost", json.dumps({"prompt": "the"}).encode(),
     {"headers": {"Host": "localhost.attacker.example"}}, 421, "is not served here"),
]


def test_host_names_a_server_answers():
    from jaxgpt.inference.http_plumbing import allowed_hosts_for, host_name

    assert set(allowed_hosts_for("127.0.0.1")) == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts_for("10.0.0.5", ["gpu-box"]) == ("10.0.0.5", "gpu-box")
    assert allowed_hosts_for("0.0.0.0") == ("*",) and allowed_hosts_for("::", ["a"]) == ("a",)
    assert [host_name(h) for h in ("LocalHost:80", "[::1]:8000", "::1", "example.com")] == \
        ["localhost", "::1", "::1", "example.com"]


@pytest.mark.parametrize("name, raw, extra, status, message", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_requests_get_clear_4xx_errors(server, name, raw, extra, status, message):
    got, text = _post(server, raw, **extra)
    assert got == status, f"{name}: {got} {text[:300]}"
    body = json.loads(text)
    assert message in body["error"]["message"], body
    assert "Traceback" not in text and "/jaxgpt/" not in text


def test_a_step_without_its_record_is_refused_when_older_steps_have_theirs(tmp_path):
    """Runs saved before steps said they are sealed: a newer step missing its record, in a run whose
    older steps have theirs, is refused; a run that never had records loads unverified."""
    from jaxgpt.weights import integrity

    for step in (1, 2):
        (tmp_path / "run" / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (tmp_path / "run" / "checkpoints" / str(step) / "state" / "d").write_bytes(b"x" * step)
    assert integrity.problem(tmp_path / "run" / "checkpoints" / "2") is None  # nothing sealed: unverified
    integrity.write_manifest(tmp_path / "run" / "checkpoints" / "1")
    assert "older steps of this run have theirs" in integrity.problem(tmp_path / "run" / "checkpoints" / "2")
    assert integrity.problem(tmp_path / "run" / "checkpoints" / "1") is None
    (tmp_path / "run" / "best" / "3").mkdir(parents=True)  # the best step beside them counts as the same run
    assert "older steps" in integrity.problem(tmp_path / "run" / "best" / "3")


def test_an_unsealed_step_missing_orbax_metadata_is_named(tmp_path):
    """In a run that never had integrity records, a step folder without Orbax's metadata is named
    as damaged (with the newest usable step), not passed over."""
    from jaxgpt.weights.checkpoint import CheckpointError, locate

    for step in (1, 2):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    (tmp_path / "checkpoints" / "1" / "_CHECKPOINT_METADATA").write_text("{}")
    with pytest.raises(CheckpointError, match=r"checkpoints/2 is corrupt \(its checkpoint metadata .* is missing\); "
                                              r"the newest intact step is .*checkpoints/1"):
        locate(tmp_path)
    assert locate(tmp_path, fallback=True, quiet=True).step == 1
