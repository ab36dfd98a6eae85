"""Instruction finetuning (the book's chapter 7): Alpaca prompts, the collate function, training,
test-set responses, and their evaluation (automatic overlap scores and an optional LLM judge).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import jax
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.data.corpus import DataError
from jaxgpt.data.instructions import (  # noqa: F401  (the Alpaca format lives with the data; re-exported here)
    PREAMBLE, RESPONSE_MARKER, book_split, check_entries, format_example, format_input, load_instruction_data,
)
from jaxgpt.finetune.loop import (FinetuneConfig, shuffled_index_batches, count_trainable, fit, gpt_config_for_finetuning, model_params,
                       trainable_mask, with_lora, write_results)
from jaxgpt.nn.model import GPT, count_params, cross_entropy

IGNORE_INDEX = -100


def collate(sequences: Sequence[Sequence[int]], pad_id: int, *, ignore_index: int = IGNORE_INDEX,
            allowed_max_length: Optional[int] = None, prompt_lengths: Optional[Sequence[int]] = None,
            pad_to_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The book's `custom_collate_fn`: (inputs_bt, targets_bt) for a batch of token sequences.

    Each sequence gets one end-of-text token (`pad_id`), then padding with `pad_id` to the longest
    in the batch (+1); targets are inputs shifted by one, and every padding target after the first
    end-of-text becomes `ignore_index`. With `prompt_lengths`, targets that are prompt tokens are
    ignored too, so only responses are learned. `allowed_max_length` truncates. `pad_to_multiple`
    rounds the length up (ignored targets only) so batches share compiled shapes.
    """
    longest = max(len(s) for s in sequences)  # inputs and targets are this long (the +1 is the end-of-text)
    width = -(-longest // pad_to_multiple) * pad_to_multiple
    inputs = np.full((len(sequences), width), pad_id, np.int32)
    targets = np.full((len(sequences), width), ignore_index, np.int32)
    for r, seq in enumerate(sequences):
        row = np.array(list(seq) + [pad_id] * (longest + 1 - len(seq)), np.int32)  # sequence, end-of-text, padding
        inputs[r, :longest] = row[:-1]
        t = row[1:].copy()
        t[len(seq):] = ignore_index  # every padding target but the first end-of-text, which ends the response
        if prompt_lengths is not None:
            t[:max(prompt_lengths[r] - 1, 0)] = ignore_index  # target j is token j + 1
        targets[r, :longest] = t
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


# --- training -----------------------------------------------------------------------------------

def _loss_fn(config: GPTConfig, lora):
    def loss_fn(params, batch, rng, deterministic):
        logits_btv = GPT(config).apply({"params": model_params(params, lora)}, batch["inputs"],
                                       deterministic=deterministic, rngs=None if deterministic else {"dropout": rng})
        return cross_entropy(logits_btv, batch["targets"], IGNORE_INDEX), None

    return loss_fn


def _encode(entries, tokenizer):
    seqs = [tokenizer.encode(format_example(e)) for e in entries]
    prompts = [len(tokenizer.encode(format_input(e) + RESPONSE_MARKER.rstrip("\n"))) for e in entries]
    return seqs, prompts


def mean_loss(params, config, lora, seqs, prompts, tokenizer, batch_size: int, mask_prompt: bool,
              pad_to_multiple: int) -> float:
    """Token-weighted validation loss over all sequences."""
    fn = _eval_loss_fn(config, lora)
    total, count = 0.0, 0
    for start in range(0, len(seqs), batch_size):
        sl = slice(start, start + batch_size)
        x, y = collate(seqs[sl], tokenizer.eot_id, allowed_max_length=config.context_length,
                       prompt_lengths=prompts[sl] if mask_prompt else None, pad_to_multiple=pad_to_multiple)
        n = int(np.sum(y != IGNORE_INDEX))
        total += float(fn(params, x, y)) * n
        count += n
    return total / max(count, 1)


@functools.lru_cache(maxsize=None)
def _eval_loss_fn(config: GPTConfig, lora):
    """The jitted evaluation loss of one model shape (built once, reused every epoch)."""
    loss_fn = _loss_fn(config, lora)
    return jax.jit(lambda p, x, y: loss_fn(p, {"inputs": x, "targets": y}, None, True)[0])


def finetune_instructions(gpt_params: dict, config: GPTConfig, tokenizer, splits, cfg: FinetuneConfig,
                          out_dir: Path, *, mask_prompt: bool = False, max_new_tokens: int = 256,
                          pad_to_multiple: int = 64, progress: bool = True, extra_meta: Optional[dict] = None) -> dict:
    """Finetune on (train, val, test) entries; then answer the test set and score the answers.

    Writes in `out_dir`: metrics.jsonl, loss.png, `model/` (a plain jaxgpt checkpoint with any LoRA
    adapters merged: generate/serve/convert take it), test-responses.json and results.json.
    """
    from jaxgpt.train.run_dir import save_for_inference
    from jaxgpt.train.metrics import JsonlLogger, plot_curves, read_jsonl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_e, val_e, test_e = splits
    if not train_e or not val_e:
        raise DataError(f"need training and validation entries; got {len(train_e)} / {len(val_e)}")
    config = gpt_config_for_finetuning(config, cfg)
    train_seqs, train_prompts = _encode(train_e, tokenizer)
    val_seqs, val_prompts = _encode(val_e, tokenizer)
    too_long = sum(len(s) + 1 > config.context_length for s in train_seqs)
    if too_long:
        print(f"[jaxgpt] {too_long} of {len(train_seqs)} training examples exceed the context "
              f"({config.context_length} tokens) and are truncated", file=sys.stderr)

    params = with_lora(gpt_params["params"], cfg, jax.random.key(cfg.seed))
    mask = trainable_mask(params, cfg, config.n_layers)
    results: dict = {"examples": {"train": len(train_e), "val": len(val_e), "test": len(test_e)},
                     "mask_prompt": mask_prompt, "finetune": cfg.to_dict(),
                     "params": {"trainable": count_trainable(params, mask),
                                "total": count_params(params)}}
    print(f"[jaxgpt] training {results['params']['trainable']:,} of {results['params']['total']:,} parameters "
          f"({cfg.trainable}) on {len(train_e)} examples", file=sys.stderr)
    steps_per_epoch, index_batches = shuffled_index_batches(len(train_seqs), cfg.batch_size, cfg.seed)

    def epoch_batches(epoch):
        for idx in index_batches(epoch):
            x, y = collate([train_seqs[i] for i in idx], tokenizer.eot_id, allowed_max_length=config.context_length,
                           prompt_lengths=[train_prompts[i] for i in idx] if mask_prompt else None,
                           pad_to_multiple=pad_to_multiple)
            yield {"inputs": x, "targets": y}

    history: list[dict] = []
    kw = dict(batch_size=cfg.batch_size, mask_prompt=mask_prompt, pad_to_multiple=pad_to_multiple)
    model_dir = out_dir / "model"

    def save_model(p) -> dict:
        """The finetuned model (adapters merged) as a plain jaxgpt checkpoint in `model/`."""
        merged = {"params": model_params(p, cfg.lora)}
        shutil.rmtree(model_dir, ignore_errors=True)
        save_for_inference(merged, config.replace(drop_rate=0.0), tokenizer, model_dir)
        return merged

    def end_of_epoch(p, epoch, step):
        record = {"epoch": epoch, "val_loss": mean_loss(p, config, cfg.lora, val_seqs, val_prompts, tokenizer, **kw)}
        history.append(record)
        save_model(p)
        print(f"[jaxgpt] epoch {epoch}: val loss {record['val_loss']:.4f}", file=sys.stderr)
        return record

    logger = JsonlLogger(out_dir / "metrics.jsonl")
    try:
        params = fit(params, cfg, mask, _loss_fn(config, cfg.lora), epoch_batches, steps_per_epoch, end_of_epoch,
                     logger.log, progress=progress)
    finally:
        logger.close()
    merged = {"params": model_params(params, cfg.lora)}  # as saved at the end of the last epoch
    plot_curves([r for r in read_jsonl(out_dir / "metrics.jsonl") if "train_loss" in r], ["train_loss"],
                out_dir / "loss.png", x_key="step", title="instruction finetuning", ylabel="loss")
    results["history"] = history
    if test_e:
        responses = respond(merged, config, tokenizer, test_e, max_new_tokens=max_new_tokens, progress=progress)
        entries = [{**e, "model_response": r} for e, r in zip(test_e, responses)]
        (out_dir / "test-responses.json").write_text(json.dumps(entries, indent=2))
        results["scores"] = score_responses(entries)
    write_results(out_dir / "results.json", {**results, **(extra_meta or {})})
    return results


# --- answering and scoring ----------------------------------------------------------------------

def extract_response(generated: str) -> str:
    """The text after "### Response:" (the book's `.replace("### Response:", "").strip()`)."""
    return generated.split("### Response:")[-1].strip()


def respond(params, config: GPTConfig, tokenizer, entries: Sequence[dict], *, max_new_tokens: int = 256,
            batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy answers to each entry's prompt, stopping at end-of-text (batched, KV-cached)."""
    from tqdm import tqdm

    from jaxgpt.inference.generate import Decoder

    prompts = [tokenizer.encode(format_input(e) + RESPONSE_MARKER) for e in entries]
    decoder, answers = Decoder(params, config), []  # one decoding copy for every chunk
    for start in tqdm(range(0, len(prompts), batch_size), disable=not progress, desc="respond", file=sys.stderr):
        chunk = [p[-(config.context_length - max_new_tokens):] if max_new_tokens < config.context_length else p[-1:]
                 for p in prompts[start:start + batch_size]]
        new_tokens = min(max_new_tokens, config.context_length - max(len(p) for p in chunk))
        bucket = min(-(-max(len(p) for p in chunk) // 32) * 32, config.context_length - new_tokens)
        new = decoder.generate_batch(chunk, new_tokens, eos_id=tokenizer.eot_id, pad_to=bucket)
        answers += [extract_response(tokenizer.decode(n)) for n in new]
    return answers


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of lower-cased words) by `rouge-score`, Google's
    reference implementation that papers report; an empty pair scores 1, one empty side 0."""
    if not _words(candidate) or not _words(reference):
        return float(_words(candidate) == _words(reference))
    return float(_rouge_scorer().score(reference, candidate)["rougeL"].fmeasure)


def exact_match(candidate: str, reference: str) -> bool:
    """Equal after lower-casing and dropping punctuation and extra whitespace."""
    return _words(candidate) == _words(reference)


def score_responses(entries: Sequence[dict], key: str = "model_response") -> dict:
    """Mean exact match and ROUGE-L F1 of `entry[key]` against `entry["output"]`."""
    em = [exact_match(e[key], e["output"]) for e in entries]
    rl = [rouge_l(e[key], e["output"]) for e in entries]
    return {"n": len(entries), "exact_match": float(np.mean(em)), "rouge_l_f1": float(np.mean(rl))}


def judge_prompt(entry: dict, key: str = "model_response") -> str:
    """The book's scoring prompt (section 7.8)."""
    return (f"Given the input `{format_input(entry)}` "
            f"and correct output `{entry['output']}`, "
            f"score the model response `{entry[key]}`"
            f" on a scale from 0 to 100, where 100 is the best score. "
            f"Respond with the integer number only.")


def query_ollama(prompt: str, url: str, model: str, timeout: float = 120.0) -> str:
    """One chat completion from an Ollama-compatible server (POST {url}/api/chat, streamed JSON lines)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    request = urllib.request.Request(url.rstrip("/") + "/api/chat", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    text = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            if line.strip():
                chunk = json.loads(line)
                text.append(chunk.get("message", {}).get("content", ""))
                if chunk.get("done"):
                    break
    return "".join(text)


def judge(entries: Sequence[dict], url: str, model: str = "llama3", key: str = "model_response") -> dict:
    """LLM-judge scores 0-100 per entry and their mean; replies without an integer are counted, not scored."""
    scores, unparsed = [], 0
    for entry in entries:
        reply = query_ollama(judge_prompt(entry, key), url, model)
        match = re.search(r"-?\d+", reply)
        if match and 0 <= int(match.group()) <= 100:
            scores.append(int(match.group()))
        else:
            unparsed += 1
    return {"n": len(entries), "scored": len(scores), "unparsed": unparsed,
            "mean_score": float(np.mean(scores)) if scores else None, "scores": scores}
