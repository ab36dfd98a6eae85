"""nanoGPT's CPU recipe (shakespeare_char) in jaxgpt.

4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations, lr 1e-3 cosine to 1e-4 after
100 warmup steps, dropout 0, AdamW betas (0.9, 0.99), weight decay 0.1 (on all matrices, embeddings
included, as nanoGPT), grad clip 1.0, tied embeddings. nanoGPT reaches val loss ≈1.88; on this
2-core CPU it takes about 70 ms/iteration, 2 min 30 s for the run (val loss 1.886).

Evaluation follows nanoGPT's CPU command (`--eval_iters=20`): 20 validation batches every 250
steps. That estimate is noisy (±0.02 between seeds' batches), so after the timed run the final
checkpoint is scored again on 200 batches (`final_val_loss_200_batches` in the results).

    JAXGPT_DATA_DIR=../shared/data python experiments/nanogpt_shakespeare_char.py [--devices N]
    # data parallel over one simulated CPU device per core:
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAXGPT_DATA_DIR=../shared/data \
        python experiments/nanogpt_shakespeare_char.py --devices 2 --name nanogpt_shakespeare_char_2cpu
    # the same with bf16 mixed-precision matmuls:
    ... --devices 2 --dtype bfloat16 --name nanogpt_shakespeare_char_2cpu_bf16
"""

import argparse
import json
from pathlib import Path

from _common import ROOT, run_and_publish

from jaxgpt.config import get_preset
from jaxgpt.train.config import TrainConfig
from jaxgpt.train.evaluate import evaluate_checkpoint

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--devices", type=int, default=None)
parser.add_argument("--out", default="runs/nanogpt_shakespeare_char")
parser.add_argument("--name", default="nanogpt_shakespeare_char", help="file name of the published results")
parser.add_argument("--dtype", default="float32", help="compute dtype: float32, or bfloat16 (mixed precision)")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

model = get_preset("tiny", tie_embeddings=True, dtype=args.dtype)  # 4 layers, 4 heads, 128 wide, context 64, dropout 0
cfg = TrainConfig(
    data="tinyshakespeare", tokenizer="char", train_ratio=0.9, batch_size=12, max_steps=args.steps,
    lr=1e-3, min_lr=1e-4, warmup_steps=100, beta1=0.9, beta2=0.99, weight_decay=0.1, decay_embeddings=True,
    grad_clip=1.0, log_every=50, eval_every=250, eval_batches=20, ckpt_every=1000, keep_checkpoints=1,
    samples=1, sample_tokens=300, devices=args.devices, seed=args.seed,
)
result = run_and_publish(args.name, model, cfg, Path(args.out),
                         reference={"nanogpt_val_loss": 1.886, "nanogpt_ms_per_iter": 70, "nanogpt_wall_s": 150})
precise = evaluate_checkpoint(Path(args.out), batches=200)  # after the timed run: not in its wall time
result["final_val_loss_200_batches"] = precise["val_loss"]
(ROOT / "docs" / "results" / f"{args.name}.json").write_text(json.dumps(result, indent=2))
print(json.dumps({"final_val_loss_200_batches": precise["val_loss"]}))
