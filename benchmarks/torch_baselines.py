"""The PyTorch baselines of `jaxgpt bench` (needs the `bench` extra: torch). Never imported by jaxgpt.

- `BookGPT`: the book's chapter-4 GPTModel as the book writes it — separate W_query/W_key/W_value,
  its own LayerNorm and tanh-GELU modules, explicit masked softmax, dropout on the attention weights.
- `FastGPT`: the same function written well — one fused QKV projection,
  `F.scaled_dot_product_attention` (its dropout on the weights), `nn.LayerNorm`, `F.gelu(tanh)`.
Both take a `jaxgpt.config.GPTConfig` and have the same parameter count as jaxgpt's GPT.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class _BookLayerNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.eps, self.scale, self.shift = eps, nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift


class _BookGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1 + torch.tanh(torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))))


class _BookMHA(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.n, self.h = cfg.n_heads, d // cfg.n_heads
        self.W_query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.W_value = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.out_proj = nn.Linear(d, d)
        self.dropout = nn.Dropout(cfg.drop_rate)
        self.register_buffer("mask", torch.triu(torch.ones(cfg.context_length, cfg.context_length), diagonal=1))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda a: a.view(b, t, self.n, self.h).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        scores = q @ k.transpose(2, 3)
        scores.masked_fill_(self.mask.bool()[:t, :t], -torch.inf)
        weights = self.dropout(torch.softmax(scores / self.h**0.5, dim=-1))
        return self.out_proj((weights @ v).transpose(1, 2).contiguous().view(b, t, d))


class _BookBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.att = _BookMHA(cfg)
        self.ff = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), _BookGELU(), nn.Linear(cfg.mlp_ratio * d, d))
        self.norm1, self.norm2 = _BookLayerNorm(d, cfg.ln_eps), _BookLayerNorm(d, cfg.ln_eps)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        x = x + self.drop_shortcut(self.att(self.norm1(x)))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class _FastBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.emb_dim
        self.n, self.p = cfg.n_heads, cfg.drop_rate
        self.ln_1, self.ln_2 = nn.LayerNorm(d, eps=cfg.ln_eps), nn.LayerNorm(d, eps=cfg.ln_eps)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=cfg.qkv_bias), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, cfg.mlp_ratio * d), nn.Linear(cfg.mlp_ratio * d, d)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (a.view(b, t, self.n, d // self.n).transpose(1, 2) for a in self.c_attn(self.ln_1(x)).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")))


class _GPT(nn.Module):
    def __init__(self, cfg, block, final_norm) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[block(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = final_norm
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device)))
        return self.out_head(self.final_norm(self.trf_blocks(x)))


def BookGPT(cfg) -> nn.Module:  # noqa: N802 - a constructor, named like the class it builds
    return _GPT(cfg, _BookBlock, _BookLayerNorm(cfg.emb_dim, cfg.ln_eps))


def FastGPT(cfg) -> nn.Module:  # noqa: N802
    return _GPT(cfg, _FastBlock, nn.LayerNorm(cfg.emb_dim, eps=cfg.ln_eps))


def train_step_fn(model: nn.Module, lr: float = 4e-4, weight_decay: float = 0.1, grad_clip: float = 1.0,
                  autocast_dtype: Optional[torch.dtype] = None):
    """One training step on (x, y) token batches, the recipe `jaxgpt train` runs: clip the gradients'
    global norm to `grad_clip` (0: no clipping), then AdamW. Returns the loss (a float).

    `autocast_dtype=torch.bfloat16` runs the forward pass under CPU autocast (bf16 matmuls, f32
    master weights): PyTorch's counterpart of jaxgpt's `dtype="bfloat16"`."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()

    def step(x, y) -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        return loss.item()

    return step


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
