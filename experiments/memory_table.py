"""Per-device memory of the gpt2 presets under data parallelism vs FSDP, on paper.

Per device, in float32, training with AdamW:
- parameters 4N bytes, gradients 4N, Adam moments 8N: replicated under data parallelism,
  divided by the number of devices n under FSDP (plus, transiently, one block's gathered weights);
- activations for `--seq-per-device` sequences of `--context` tokens, without rematerialisation:
  per layer 2·s·b·h·(34 + 5·a·s/h) bytes (Korthikanti et al. 2022, "Reducing Activation
  Recomputation", eq. 1, doubled from 16-bit to 32-bit), plus the logits and their gradient
  (2·b·s·V·4 bytes); the same under both schemes, since each device holds the same batch share.
N counts the tied-embedding model (GPT-2's own checkpoints tie the head to wte).

    python experiments/memory_table.py [--context 1024] [--seq-per-device 1]  > docs/results/memory_table.md
"""

import argparse

from jaxgpt.config import get_preset
from jaxgpt.nn.model import param_counts

parser = argparse.ArgumentParser()
parser.add_argument("--context", type=int, default=1024)
parser.add_argument("--seq-per-device", type=int, default=1)
args = parser.parse_args()

GB = 1024**3
DEVICES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
s, b = args.context, args.seq_per_device

print(f"Per-device training memory in GiB (float32, AdamW; {b} sequence(s) of {s} tokens per device; "
      "params + grads + Adam state + activations). DP = data parallel (replicated state), "
      "FSDP = state sharded over all devices.\n")
print("| preset | params (tied) | state (params+grads+Adam) | activations | DP, any n | "
      + " | ".join(f"FSDP n={n}" for n in DEVICES) + " |")
print("|---|---|---|---|---|" + "---|" * len(DEVICES))
for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl"):
    cfg = get_preset(name, context_length=max(s, 1))
    n_params = param_counts(get_preset(name))["total_tied"]
    state = 16 * n_params  # params 4 + grads 4 + Adam mu 4 + nu 4 bytes per parameter
    h, a, L, V = cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.vocab_size
    acts = L * 2 * s * b * h * (34 + 5 * a * s / h) + 2 * b * s * V * 4
    block = 12 * h * h * 4  # one block's gathered weights under FSDP
    dp = (state + acts) / GB
    fsdp = [((state / n) + acts + (block if n > 1 else 0)) / GB for n in DEVICES]
    print(f"| {name} | {n_params / 1e6:,.0f}M | {state / GB:.2f} | {acts / GB:.2f} | {dp:.2f} | "
          + " | ".join(f"{v:.2f}" for v in fsdp) + " |  ")
print("\nData parallelism needs the whole state on every device whatever n is; FSDP divides it by n "
      "(n=1 equals DP). Activations then dominate; rematerialisation or sequence sharding is the next lever.")
