"""Classification by prompting a language model, without training (zero-shot and few-shot).

The prompt shows k labelled examples, then the query; the predicted label is the one whose words
the model finds most likely next (sum of the label tokens' log-probabilities). This is the baseline
that tells users what finetuning buys.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgpt.config import GPTConfig
from jaxgpt.nn.model import GPT

INSTRUCTION = "Classify each text message as {labels}.\n\n"
EXAMPLE = "Message: {text}\nLabel:"


def build_prompt(query: str, examples: Sequence[tuple[str, str]], labels: Sequence[str]) -> str:
    """The instruction, k "Message/Label" examples, then the query's "Message: …\\nLabel:"."""
    shots = "".join(EXAMPLE.format(text=text) + f" {label}\n\n" for text, label in examples)
    return INSTRUCTION.format(labels=" or ".join(labels)) + shots + EXAMPLE.format(text=query)


def pick_examples(train_rows: Sequence[tuple[str, str]], shots: int, labels: Sequence[str], seed: int):
    """`shots` training examples, as balanced over the labels as possible, in a seeded order."""
    rng = np.random.RandomState(seed)
    by_label = {label: [r for r in train_rows if r[1] == label] for label in labels}
    picked = [by_label[labels[i % len(labels)]][rng.randint(len(by_label[labels[i % len(labels)]]))]
              for i in range(shots)]
    return [picked[i] for i in rng.permutation(len(picked))]


@partial(jax.jit, static_argnames="config")
def _sequence_logprobs(params, ids_bt, targets_bt, config: GPTConfig):
    """Sum of log p(target) over the positions whose target is not -1, per row."""
    logp_btv = jax.nn.log_softmax(GPT(config).apply(params, ids_bt), axis=-1)
    valid_bt = targets_bt >= 0
    picked_bt = jnp.take_along_axis(logp_btv, jnp.where(valid_bt, targets_bt, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(picked_bt * valid_bt, axis=1)


def label_scores(params, config: GPTConfig, tokenizer, prompts: Sequence[str], labels: Sequence[str],
                 batch_size: int = 16) -> np.ndarray:
    """(n_prompts, n_labels) log p(" label" | prompt) under a model's {"params": …}; prompts too long
    lose their beginning."""
    label_ids = [tokenizer.encode(" " + label) for label in labels]
    rows, targets = [], []
    for prompt in prompts:
        p_ids = tokenizer.encode(prompt)
        for l_ids in label_ids:
            seq = (p_ids + l_ids)[-config.context_length - 1:]  # keep the end: the query and the label
            rows.append(seq[:-1])
            targets.append([-1] * (len(seq) - 1 - len(l_ids)) + l_ids)
    width = max(len(r) for r in rows)
    width = min(config.context_length, -(-width // 32) * 32)  # bucket the length: fewer compilations
    ids = np.full((len(rows), width), tokenizer.eot_id, np.int32)
    tgt = np.full((len(rows), width), -1, np.int32)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, :len(r)], tgt[i, :len(t)] = r, t
    scores = []
    for start in range(0, len(rows), batch_size):
        idx = np.arange(start, min(start + batch_size, len(rows)))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[0])])
        scores.append(np.asarray(_sequence_logprobs(params, ids[pad], tgt[pad], config))[: len(idx)])
    return np.concatenate(scores).reshape(len(prompts), len(labels))


def prompt_accuracy(params, config: GPTConfig, tokenizer, train_rows, test_rows, *, shots: int, seed: int = 123) -> float:
    """Accuracy on `test_rows` of k-shot prompting with examples drawn from `train_rows`."""
    labels = sorted({label for _, label in train_rows})
    examples = pick_examples(train_rows, shots, labels, seed)
    prompts = [build_prompt(text, examples, labels) for text, _ in test_rows]
    predicted = np.argmax(label_scores(params, config, tokenizer, prompts, labels), axis=1)
    return float(np.mean([labels[p] == label for p, (_, label) in zip(predicted, test_rows)]))
