"""The book's chapter 5 pretraining run on "The Verdict", in jaxgpt.

gpt2-small shape with context 256, dropout 0.1, no qkv bias, untied head; 90/10 split by characters;
windows of 256 with stride 256, batch 2, shuffled, drop_last; AdamW lr 4e-4 (constant, as the book),
weight decay 0.1, torch's default betas (0.9, 0.999); 10 epochs. The book starts at ≈10.98 and ends
at train ≈0.57 / val ≈6.37 (it memorises the text).

    JAXGPT_DATA_DIR=../shared/data python experiments/ch5_the_verdict.py [--epochs 10] [--init book|gpt2]
"""

import argparse
from pathlib import Path

from _common import run_and_publish

from jaxgpt.config import get_preset
from jaxgpt.data.corpus import SlidingWindowDataset, load_text
from jaxgpt.data.tokenizer import GPT2Tokenizer
from jaxgpt.train.config import TrainConfig

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--init", choices=["gpt2", "book"], default="book",
                    help="book: PyTorch's nn.Embedding default N(0, 1) for wte/wpe, as the book's model; "
                         "gpt2: GPT-2's N(0, 0.02)")
parser.add_argument("--out", default=None)
args = parser.parse_args()
name = f"ch5_the_verdict_{args.init}_init"

model = get_preset("gpt2-small", context_length=256, drop_rate=0.1, qkv_bias=False,
                   emb_init_std=1.0 if args.init == "book" else 0.02)
text = load_text("the-verdict")
train_ids = GPT2Tokenizer().encode(text[: int(0.9 * len(text))])
steps_per_epoch = len(SlidingWindowDataset(train_ids, 256, 256)) // 2
cfg = TrainConfig(
    data="the-verdict", tokenizer="gpt2", train_ratio=0.9, sampling="epochs", stride=256, batch_size=2,
    max_steps=args.epochs * steps_per_epoch, lr=4e-4, min_lr=4e-4, warmup_steps=0, weight_decay=0.1,
    decay_embeddings=True, beta1=0.9, beta2=0.999, grad_clip=0.0, log_every=1, eval_every=5, eval_batches=10,
    ckpt_every=10_000, keep_checkpoints=1, samples=1, sample_tokens=25,
)
run_and_publish(name, model, cfg, Path(args.out or f"runs/{name}"),
                reference={"book_initial_loss": 10.98, "book_final_train_loss": 0.57, "book_final_val_loss": 6.37})
