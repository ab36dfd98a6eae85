"""The book's chapters 6 (spam classification), 7 (instruction following) and appendix E (LoRA) in jaxgpt.

No GPT-2 weights are available offline, so the base model is pretrained here with jaxgpt (GPT-2
BPE tokenizer, the `small` preset at context 256, on the embedded python-docs corpus), then:
- spam classification from it with several choices (trainable part, pooling, LoRA), and from a
  random initialisation of the same shape; zero- and few-shot prompting of the base model beside;
- instruction finetuning from it, with test-set responses scored by exact match and ROUGE-L.
Everything is written to docs/results/finetune_book.json (and the accuracy plot of one run).

    JAXGPT_DATA_DIR=../shared/data python experiments/finetune_book.py [--pretrain-steps 400] [--only classify]
"""

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from _common import run_cli  # noqa: E402  (experiments/ is on the path when run as a script)

parser = argparse.ArgumentParser()
parser.add_argument("--pretrain-steps", type=int, default=400)
parser.add_argument("--runs", default=str(ROOT / "runs"), help="where the runs go")
parser.add_argument("--only", choices=["classify", "instruct"], default=None)
args = parser.parse_args()
runs = Path(args.runs)
base = runs / "exp-pretrain-bpe"


jaxgpt = run_cli  # the CLI, as users run it (--json output)


if not (base / "checkpoints").is_dir():
    jaxgpt("train", "--preset", "small", "--tokenizer", "gpt2", "--max-steps", str(args.pretrain_steps),
           "--set", "model.context_length=256", "--set", "train.batch_size=8", "--set", "train.eval_every=100",
           "--out", str(base))
from jaxgpt.weights.checkpoint import read_meta  # noqa: E402

pretrain = read_meta(base)  # the checkpoint finetuning starts from (the run's newest saved state)
results_path = ROOT / "docs" / "results" / "finetune_book.json"
results = json.loads(results_path.read_text()) if results_path.exists() else {}
results["base_model"] = {"command": f"jaxgpt train --preset small --tokenizer gpt2 --max-steps {args.pretrain_steps} "
                                    "--set model.context_length=256 --set train.batch_size=8",
                         "model": pretrain["model"], "checkpoint_step": pretrain.get("step"),
                         "best_val_loss": pretrain.get("best_val_loss")}

CLASSIFY = {  # name: (extra CLI arguments)
    "last-block, last token (book)": ["--checkpoint", str(base), "--pooling", "last"],
    "last-block, last non-pad token": ["--checkpoint", str(base), "--pooling", "last-nonpad", "--prompt-shots", ""],
    "head only, last non-pad token": ["--checkpoint", str(base), "--pooling", "last-nonpad", "--trainable", "head",
                                      "--prompt-shots", ""],
    "LoRA r=16 (+head), last non-pad": ["--checkpoint", str(base), "--pooling", "last-nonpad", "--trainable", "lora",
                                        "--lora-rank", "16", "--lora-alpha", "256", "--prompt-shots", ""],
    "all parameters, last non-pad": ["--checkpoint", str(base), "--pooling", "last-nonpad", "--trainable", "all",
                                     "--prompt-shots", ""],
    "random init, all parameters, last non-pad": ["--preset", "small", "--pooling", "last-nonpad", "--trainable", "all",
                                                  "--prompt-shots", ""],
}

if args.only in (None, "classify"):
    results["classify"] = {}
    for name, extra in CLASSIFY.items():
        out = runs / ("exp-classify-" + "".join(c if c.isalnum() else "-" for c in name))
        shutil.rmtree(out, ignore_errors=True)
        r = jaxgpt("finetune", "classify", "--out", str(out), *extra)
        results["classify"][name] = {
            "command": "jaxgpt finetune classify " + " ".join(extra).replace(str(base), "runs/exp-pretrain-bpe"),
            **{k: r[k] for k in ("train_accuracy", "val_accuracy", "test_accuracy", "params", "wall_s")},
            **({"prompting": r["prompting"]} if "prompting" in r else {}),
        }
        print(name, json.dumps(results["classify"][name]), flush=True)
        if name.startswith("last-block, last token"):
            shutil.copy(out / "accuracy.png", ROOT / "docs" / "results" / "finetune_spam_accuracy.png")

if args.only in (None, "instruct"):
    out = runs / "exp-instruct"
    shutil.rmtree(out, ignore_errors=True)
    extra = ["--checkpoint", str(base), "--epochs", "2", "--max-new-tokens", "64", "--mask-prompt"]
    r = jaxgpt("finetune", "instruct", "--out", str(out), *extra)
    examples = json.loads((out / "test-responses.json").read_text())[:3]
    results["instruct"] = {"command": "jaxgpt finetune instruct " + " ".join(extra).replace(str(base), "runs/exp-pretrain-bpe"),
                           **{k: r[k] for k in ("history", "scores", "params", "wall_s")},
                           "examples": [{k: e[k] for k in ("instruction", "input", "output", "model_response")} for e in examples]}
    print(json.dumps(results["instruct"]), flush=True)

results_path.write_text(json.dumps(results, indent=2))
