"""Preference tuning with DPO (the book's chapter-7 bonus; Rafailov et al., 2023).

From an instruction-finetuned model and pairs (instruction, input, chosen, rejected), DPO raises the
policy's log-probability of the chosen response relative to a frozen reference model (the starting
model) and lowers the rejected one's, with no reward model and no sampling:

    loss = −mean log σ(β · [(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))])

A response's log-probability is the sum over its tokens (the prompt's targets are masked, as
`finetune instruct --mask-prompt` does). The reference model's log-probabilities never change, so
they are computed once for every pair before training: the frozen model need not stay in memory.
The implicit reward of a response is β · (log π − log π_ref); the metrics are the chosen-minus-
rejected reward margin and the share of pairs whose margin is positive (reward accuracy), on the
training pairs and on held-out ones. The NumPy reference is `jaxgpt.reference.dpo`.
"""

from __future__ import annotations

import functools
import json
import math
import random
import sys
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.data.corpus import DataError
from jaxgpt.finetune.instruct import (IGNORE_INDEX, RESPONSE_MARKER, check_entries, collate, format_input,
                                      query_ollama)
from jaxgpt.finetune.loop import (FinetuneConfig, count_trainable, fit, gpt_config_for_finetuning, model_params,
                                  shuffled_index_batches, trainable_mask, with_lora, write_results)
from jaxgpt.nn.model import GPT, count_params

PAD_TO = 64  # batches padded to a multiple of this many tokens: few compiled shapes


def sequence_logprobs(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
    """(b,) sum of log p(target) over the positions whose target is not IGNORE_INDEX."""
    valid_bt = targets_bt != IGNORE_INDEX
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    picked_bt = jnp.take_along_axis(logp_btv, jnp.where(valid_bt, targets_bt, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(picked_bt * valid_bt, axis=-1)


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean DPO loss, metrics): the implicit reward margin and its accuracy, and both rewards."""
    chosen_reward, rejected_reward = beta * (pi_chosen - ref_chosen), beta * (pi_rejected - ref_rejected)
    margins = chosen_reward - rejected_reward
    loss = -jnp.mean(jax.nn.log_sigmoid(margins))
    return loss, {"reward_margin": jnp.mean(margins), "reward_accuracy": jnp.mean(margins > 0),
                  "chosen_reward": jnp.mean(chosen_reward), "rejected_reward": jnp.mean(rejected_reward)}


def load_preferences(path: Path) -> list[dict]:
    """The book's preference file: a JSON list of {instruction, input?, chosen, rejected}."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    check_entries(data, path, fields=("instruction", "chosen", "rejected"))
    return data


def _encode_pairs(entries: Sequence[dict], tokenizer) -> dict:
    prompts = [format_input(e) + RESPONSE_MARKER for e in entries]
    prompt_lens = [len(tokenizer.encode(p.rstrip("\n"))) for p in prompts]
    return {"chosen": [tokenizer.encode(p + e["chosen"]) for p, e in zip(prompts, entries)],
            "rejected": [tokenizer.encode(p + e["rejected"]) for p, e in zip(prompts, entries)],
            "prompt_lens": prompt_lens}


def _pair_batch(pairs: dict, idx, eot_id: int, context: int) -> dict:
    """Chosen and rejected sequences of the pairs `idx`, collated together (one width): x, y (2b, t)."""
    seqs = [pairs["chosen"][i] for i in idx] + [pairs["rejected"][i] for i in idx]
    lens = [pairs["prompt_lens"][i] for i in idx] * 2
    x, y = collate(seqs, eot_id, allowed_max_length=context, prompt_lengths=lens, pad_to_multiple=PAD_TO)
    return {"inputs": x, "targets": y}


@functools.lru_cache(maxsize=None)
def _logprob_fn(config: GPTConfig):
    return jax.jit(lambda p, x, y: sequence_logprobs(GPT(config).apply(p, x), y))


def pair_logprobs(params, config: GPTConfig, pairs: dict, eot_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) summed response log-probabilities of every pair under `params` ({"params": …})."""
    n = len(pairs["chosen"])
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(start + batch_size, n)))
        batch = _pair_batch(pairs, idx, eot_id, config.context_length)
        out.append(np.asarray(_logprob_fn(config)(params, batch["inputs"], batch["targets"])).reshape(2, -1))
    both = np.concatenate(out, axis=1)
    return both[0], both[1]


def _loss_fn(config: GPTConfig, lora, beta: float):
    def loss_fn(params, batch, rng, deterministic):
        logits = GPT(config).apply({"params": model_params(params, lora)}, batch["inputs"],
                                   deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
        pi_chosen, pi_rejected = jnp.split(sequence_logprobs(logits, batch["targets"]), 2)
        return dpo_loss(pi_chosen, pi_rejected, batch["ref_chosen"], batch["ref_rejected"], beta)

    return loss_fn


def evaluate_pairs(params, config: GPTConfig, lora, pairs: dict, ref: tuple, eot_id: int, beta: float,
                   batch_size: int) -> dict:
    """DPO loss, reward margin and reward accuracy of the policy `params` over all `pairs`."""
    pi_c, pi_r = pair_logprobs({"params": model_params(params, lora)}, config, pairs, eot_id, batch_size)
    loss, metrics = dpo_loss(jnp.asarray(pi_c), jnp.asarray(pi_r), jnp.asarray(ref[0]), jnp.asarray(ref[1]), beta)
    return {"dpo_loss": float(loss), **{k: float(v) for k, v in metrics.items()}}


def _check_lengths(pairs: dict, context: int) -> None:
    """Pairs whose response is cut away by the context teach nothing: refuse when all are, say how many."""
    lost = sum(n >= context for n in pairs["prompt_lens"])
    cut = sum(max(len(c), len(r)) + 1 > context for c, r in zip(pairs["chosen"], pairs["rejected"]))
    if lost == len(pairs["prompt_lens"]):
        raise DataError(f"every prompt is at least as long as the model's context ({context} tokens): no response "
                        "token would be scored")
    if cut:
        print(f"[jaxgpt] {cut} of {len(pairs['chosen'])} pairs exceed the context ({context} tokens) and are "
              f"truncated ({lost} lose their whole response)", file=sys.stderr)


def finetune_dpo(gpt_params: dict, config: GPTConfig, tokenizer, splits, cfg: FinetuneConfig, out_dir: Path, *,
                 beta: float = 0.1, progress: bool = True, extra_meta: Optional[dict] = None) -> dict:
    """DPO on (train, val) preference pairs from the model `gpt_params` (also the frozen reference).

    Writes in `out_dir`: metrics.jsonl (train loss per log step; per epoch the held-out and training
    reward margin, reward accuracy and DPO loss), dpo.png, `model/` (adapters merged) and results.json.
    """
    from jaxgpt.atomic import atomic_directory
    from jaxgpt.train.metrics import JsonlLogger, plot_curves, read_jsonl
    from jaxgpt.train.run_dir import save_for_inference

    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"DPO beta must be a finite number > 0, got {beta}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_e, val_e = splits
    if not train_e or not val_e:
        raise DataError(f"need training and held-out preference pairs; got {len(train_e)} / {len(val_e)}")
    config = gpt_config_for_finetuning(config, cfg)
    train_p, val_p = _encode_pairs(train_e, tokenizer), _encode_pairs(val_e, tokenizer)
    _check_lengths(train_p, config.context_length)
    eot, bs = tokenizer.eot_id, cfg.batch_size
    frozen = config.replace(drop_rate=0.0)
    ref_train = pair_logprobs(gpt_params, frozen, train_p, eot, bs)  # the reference model, once
    ref_val = pair_logprobs(gpt_params, frozen, val_p, eot, bs)
    params = with_lora(gpt_params["params"], cfg, jax.random.key(cfg.seed))
    mask = trainable_mask(params, cfg, config.n_layers)
    results: dict = {"pairs": {"train": len(train_e), "val": len(val_e)}, "beta": beta, "finetune": cfg.to_dict(),
                     "params": {"trainable": count_trainable(params, mask), "total": count_params(params)}}
    print(f"[jaxgpt] DPO (beta {beta}) on {results['params']['trainable']:,} of {results['params']['total']:,} "
          f"parameters ({cfg.trainable}), {len(train_e)} pairs", file=sys.stderr)
    steps_per_epoch, index_batches = shuffled_index_batches(len(train_e), bs, cfg.seed)

    def epoch_batches(epoch):
        for idx in index_batches(epoch):
            batch = _pair_batch(train_p, idx, eot, config.context_length)  # (2b, t): chosen rows, then rejected
            yield {"ref_chosen": ref_train[0][idx], "ref_rejected": ref_train[1][idx], **batch}  # b pairs first (fit counts them)

    evaluate = lambda p, pairs, ref: evaluate_pairs(p, frozen, cfg.lora, pairs, ref, eot, beta, bs)  # noqa: E731
    history = [{"epoch": 0, **{f"val_{k}": v for k, v in evaluate(params, val_p, ref_val).items()}}]

    def end_of_epoch(p, epoch, step):
        record = {"epoch": epoch, **{f"val_{k}": v for k, v in evaluate(p, val_p, ref_val).items()},
                  **{f"train_{k}": v for k, v in evaluate(p, train_p, ref_train).items()}}
        history.append(record)
        with atomic_directory(out_dir / "model", force=True, what="model folder") as tmp:  # the last epoch's, whole
            save_for_inference({"params": model_params(p, cfg.lora)}, frozen, tokenizer, tmp)
        print(f"[jaxgpt] epoch {epoch}: train reward margin {record['train_reward_margin']:.3f}", file=sys.stderr)
        print(f"[jaxgpt] epoch {epoch}: held-out reward margin {record['val_reward_margin']:.3f}, "
              f"accuracy {record['val_reward_accuracy']:.1%}", file=sys.stderr)
        return record

    logger = JsonlLogger(out_dir / "metrics.jsonl")
    try:
        logger.log({"step": 0, **history[0]})
        fit(params, cfg, mask, _loss_fn(config, cfg.lora, beta), epoch_batches, steps_per_epoch, end_of_epoch,
            logger.log, progress=progress)
    finally:
        logger.close()
    records = [r for r in read_jsonl(out_dir / "metrics.jsonl") if "val_reward_margin" in r]
    plot_curves(records, ["val_reward_margin", "val_reward_accuracy", "val_dpo_loss"], out_dir / "dpo.png",
                x_key="epoch", title=f"DPO, beta {beta}: held-out pairs", ylabel="value")
    results["history"] = history
    write_results(out_dir / "results.json", {**results, **(extra_meta or {})})
    return results


# --- preference pairs from instruction data -------------------------------------------------------

def offline_preferences(entries: Sequence[dict], seed: int = 0) -> list[dict]:
    """Pairs without a judge (tests, quick runs): chosen = the reference answer, rejected = another
    entry's answer (fluent but off-topic), drawn with `seed`."""
    if len(entries) < 2:
        raise DataError("need at least two instruction entries to pair answers")
    rng = random.Random(seed)
    out = []
    for i, e in enumerate(entries):
        j = rng.randrange(len(entries) - 1)
        other = entries[j + (j >= i)]
        out.append({"instruction": e["instruction"], "input": e.get("input", ""), "output": e["output"],
                    "chosen": e["output"], "rejected": other["output"]})
    return out


POLITE_PROMPT = ("Given the input `{input}` and correct output `{output}`, slightly rewrite the output to be more "
                 "{style}. Keep the modification minimal. Only return the generated response and nothing else.")


def judged_preferences(entries: Sequence[dict], url: str, model: str, seed: int = 0, progress: bool = True) -> list[dict]:
    """The book's bonus recipe: a judge model (Ollama-compatible API) rewrites each answer to be more
    polite or more impolite (a seeded coin per entry); the polite version is chosen, the impolite one
    rejected, the original answer standing in for the other side."""
    from tqdm import tqdm

    rng = random.Random(seed)
    out = []
    for e in tqdm(entries, desc="preference pairs", disable=not progress, file=sys.stderr):
        style = "polite" if rng.random() < 0.5 else "impolite"
        rewritten = query_ollama(POLITE_PROMPT.format(input=format_input(e), output=e["output"], style=style), url, model)
        chosen, rejected = (rewritten, e["output"]) if style == "polite" else (e["output"], rewritten)
        out.append({**e, "chosen": chosen, "rejected": rejected})
    return out
