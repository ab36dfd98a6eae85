"""The book's instruction model before and after DPO (its chapter-7 bonus), in jaxgpt.

No GPT-2 weights are available offline, so the model is the one experiments/finetune_book.py builds:
the `small` preset pretrained here (GPT-2 BPE, context 256, the embedded corpus), instruction-
finetuned on the book's data (2 epochs, prompt masked). Then:
- preference pairs from the instruction *training* split, offline (chosen = the reference answer,
  rejected = another entry's answer: `jaxgpt finetune dpo-data --offline`; no judge model here);
- `jaxgpt finetune dpo` (beta 0.1, all parameters, 10 % of the pairs held out for the metrics);
- the book's validation split (55 entries, never trained on; the instruction finetuning only
  reported its loss) answered by the model before and after DPO, scored by exact match and ROUGE-L
  (`rouge-score`).
Written to docs/results/dpo.json and docs/results/dpo.png.

    JAXGPT_DATA_DIR=../shared/data python experiments/dpo.py [--epochs 1] [--lr 5e-6]
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from _common import run_cli  # noqa: E402  (experiments/ is on the path when run as a script)

parser = argparse.ArgumentParser()
parser.add_argument("--runs", default=str(ROOT / "runs"))
parser.add_argument("--epochs", type=int, default=1)
parser.add_argument("--lr", type=float, default=5e-6)
parser.add_argument("--beta", type=float, default=0.1)
args = parser.parse_args()
runs = Path(args.runs)


jaxgpt = run_cli  # the CLI, as users run it (--json output)


sft = runs / "exp-instruct" / "model"
if not sft.is_dir():  # the base and the instruction model of experiments/finetune_book.py
    subprocess.run([sys.executable, str(ROOT / "experiments" / "finetune_book.py"), "--only", "instruct",
                    "--runs", str(runs)], check=True)

from jaxgpt.data.corpus import corpus_path  # noqa: E402
from jaxgpt.data.instructions import book_split, load_instruction_data  # noqa: E402
from jaxgpt.finetune.dpo import offline_preferences  # noqa: E402
from jaxgpt.finetune.instruct import respond, score_responses  # noqa: E402
from jaxgpt.weights.checkpoint import load_for_inference  # noqa: E402

train_e, val_e, _ = book_split(load_instruction_data(corpus_path("instruction-data")))  # (train, val, test)
prefs = runs / "exp-dpo-prefs.json"
prefs.write_text(json.dumps(offline_preferences(train_e, seed=0)))
out = runs / "exp-dpo"
shutil.rmtree(out, ignore_errors=True)
extra = ["--checkpoint", str(sft), "--data", str(prefs), "--beta", str(args.beta), "--epochs", str(args.epochs),
         "--lr", str(args.lr), "--trainable", "all"]
r = jaxgpt("finetune", "dpo", "--out", str(out), *extra)

scores = {}
for name, model_dir in (("before DPO (instruction model)", sft), ("after DPO", out / "model")):
    params, config, tokenizer = load_for_inference(model_dir)
    answers = respond(params, config, tokenizer, val_e, max_new_tokens=64, progress=False)
    scores[name] = score_responses([{**e, "model_response": a} for e, a in zip(val_e, answers)])
    scores[name]["examples"] = [{"instruction": e["instruction"], "output": e["output"], "model_response": a}
                                for e, a in list(zip(val_e, answers))[:3]]
    print(name, json.dumps({k: v for k, v in scores[name].items() if k != "examples"}), flush=True)

result = {"command": "jaxgpt finetune dpo " + " ".join(extra).replace(str(runs), "runs"), "pairs": r["pairs"],
          "beta": args.beta, "history": r["history"], "params": r["params"], "wall_s": r["wall_s"],
          "validation_split_scores": scores}
(ROOT / "docs" / "results" / "dpo.json").write_text(json.dumps(result, indent=2))
shutil.copy(out / "dpo.png", ROOT / "docs" / "results" / "dpo.png")
print(json.dumps({k: v for k, v in result.items() if k != "validation_split_scores"}, indent=1))
