"""Task evaluation (`jaxgpt evaluate`): the standard task kinds over local JSONL, and named tasks
built from the shared data sets.

A task is a dict (a YAML file, or `BUILTIN`): `name`, `kind`, `data` (a JSONL file, relative to the
YAML file) or `examples`, `limit`, and per kind:
- `multiple_choice` (HellaSwag style): `context` (a template, `{field}` placeholders), `choices`
  (the field holding the list of continuations), `gold` (the field holding the right index);
  metrics `acc` (highest log-likelihood) and `acc_norm` (log-likelihood per byte of the choice);
- `cloze` (LAMBADA style): `text` field; the last word (with its leading space) is the target;
  metrics `acc` (the greedy continuation is the target) and `perplexity` of the targets;
- `perplexity`: `text` field, each a document scored whole (`Scorer.rolling_loglikelihood`);
  metrics `token_perplexity`, `byte_perplexity`, `bits_per_byte`;
- `generate`: `prompt` template, `target` field, `max_new_tokens`, `stop` strings, `metrics` among
  exact_match, rouge (rouge-score: rouge1/rouge2/rougeL F1) and bleu, chrf (sacrebleu, corpus level).
"""

from __future__ import annotations

import json
import math
import re
import string
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np

from jaxgpt.data.corpus import DataError

if TYPE_CHECKING:  # the scorer imports JAX; the CLI lists this module's task names before JAX may start
    from jaxgpt.evaluation.scoring import Scorer

KINDS = ("multiple_choice", "cloze", "perplexity", "generate")
GENERATE_METRICS = ("exact_match", "rouge", "bleu", "chrf")


def load_task(name_or_path: str) -> dict:
    """A task by built-in name or from a YAML file, checked field by field."""
    if name_or_path in BUILTIN:
        return check_task(BUILTIN[name_or_path]())
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise DataError(f"{name_or_path!r} is neither a built-in task ({', '.join(sorted(BUILTIN))}) nor a task file")
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: a task file holds one mapping (name, kind, data, …)")
    if "data" in spec and "examples" not in spec:
        spec["examples"] = _read_jsonl(path.parent / spec["data"])
    spec.setdefault("name", path.stem)
    return check_task(spec)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: the task's data file does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not a JSON line ({e})") from None
    return rows


def check_task(spec: dict) -> dict:
    kind, name = spec.get("kind"), spec.get("name", "?")
    if kind not in KINDS:
        raise DataError(f"task {name!r}: kind must be one of {KINDS}, got {kind!r}")
    need = {"multiple_choice": ("context", "choices", "gold"), "cloze": ("text",), "perplexity": ("text",),
            "generate": ("prompt", "target")}[kind]
    missing = [k for k in ("examples",) + need if k not in spec]
    if missing:
        raise DataError(f"task {name!r} ({kind}) lacks {missing}")
    bad = [m for m in spec.get("metrics", ()) if m not in GENERATE_METRICS]
    if bad:
        raise DataError(f"task {name!r}: unknown metrics {bad}; known: {GENERATE_METRICS}")
    if not spec["examples"]:
        raise DataError(f"task {name!r} has no examples")
    limit = spec.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"task {name!r}: limit must be a positive number of examples, got {limit!r}")
    return spec


def _text(value) -> bool:
    return isinstance(value, str)


def _row_problem(spec: dict, row) -> Optional[str]:
    """What is wrong with one example of a task (its fields as the kind reads them), or None."""
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not an object of fields"
    kind = spec["kind"]
    fields = [spec[k] for k in {"multiple_choice": ("choices", "gold"), "cloze": ("text",), "perplexity": ("text",),
                                "generate": ("target",)}[kind]]
    missing = [f for f in fields if f not in row]
    if missing:
        return f"lacks the field {missing[0]!r}"
    if kind == "multiple_choice":
        choices, gold = row[spec["choices"]], row[spec["gold"]]
        if not isinstance(choices, list) or len(choices) < 2 or not all(_text(c) and c for c in choices):
            return f"field {spec['choices']!r} must be a list of at least two non-empty strings, got {choices!r:.80}"
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            return f"field {spec['gold']!r} must be the index of the right choice (0…{len(choices) - 1}), got {gold!r}"
    elif kind in ("cloze", "perplexity"):
        text = row[spec["text"]]
        if not _text(text) or not text.strip():
            return f"field {spec['text']!r} must be a non-empty string, got {text!r:.80}"
    elif not isinstance(row[spec["target"]], (str, int, float)) or isinstance(row[spec["target"]], bool):
        return f"field {spec['target']!r} must be a string (or number), got {row[spec['target']]!r:.80}"
    return None


def check_rows(spec: dict, rows: list) -> None:
    """Refuse, naming the example and the field, any example the task's kind would misread (a
    gold index out of range, a string where a list of choices belongs, a missing field, an empty text)."""
    for n, row in enumerate(rows, 1):
        problem = _row_problem(spec, row)
        if problem:
            where = f"{spec['data']}, example {n}" if "data" in spec else f"example {n}"
            raise DataError(f"task {spec['name']!r}: {where} {problem}")


def _fill(template: str, row: dict, name: str) -> str:
    try:
        return template.format_map(row)
    except KeyError as e:
        raise DataError(f"task {name!r}: an example has no field {e} that its template uses") from None


def run_multiple_choice(scorer: Scorer, spec: dict, rows: list[dict]) -> dict:
    enc, requests, spans = scorer.tokenizer.encode, [], []
    for row in rows:
        context = enc(_fill(spec["context"], row, spec["name"]))
        choices = row[spec["choices"]]
        spans.append((len(requests), choices, int(row[spec["gold"]])))
        requests += [(context, enc(c)) for c in choices]
    scores = scorer.loglikelihood(requests)
    acc, acc_norm = [], []
    for start, choices, gold in spans:
        lps = np.array([scores[start + i][0] for i in range(len(choices))])
        acc.append(int(np.argmax(lps)) == gold)
        acc_norm.append(int(np.argmax(lps / np.array([max(len(c.encode()), 1) for c in choices]))) == gold)
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}


def run_cloze(scorer: Scorer, spec: dict, rows: list[dict]) -> dict:
    requests = []
    for row in rows:
        text = row[spec["text"]].rstrip()
        cut = text.rfind(" ")
        if cut <= 0:
            raise DataError(f"task {spec['name']!r}: a cloze text needs at least two words: {text[:60]!r}")
        requests.append((scorer.tokenizer.encode(text[:cut]), scorer.tokenizer.encode(text[cut:])))
    scores = scorer.loglikelihood(requests)
    n_tokens = sum(len(c) for _, c in requests)
    return {"acc": float(np.mean([g for _, g in scores])),
            "perplexity": math.exp(-sum(lp for lp, _ in scores) / n_tokens)}


def run_perplexity(scorer: Scorer, spec: dict, rows: list[dict]) -> dict:
    texts = [row[spec["text"]] for row in rows]
    ids = [scorer.tokenizer.encode(t) for t in texts]
    logp = sum(scorer.rolling_loglikelihood(i) for i in ids)
    n_tokens, n_bytes = sum(len(i) for i in ids), sum(len(t.encode()) for t in texts)
    return {"token_perplexity": math.exp(-logp / n_tokens), "byte_perplexity": math.exp(-logp / n_bytes),
            "bits_per_byte": -logp / n_bytes / math.log(2), "tokens": n_tokens, "bytes": n_bytes}


def normalise(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def generation_metrics(predictions: list[str], targets: list[str], metrics) -> dict:
    out = {}
    if "exact_match" in metrics:
        out["exact_match"] = float(np.mean([normalise(p) == normalise(t) for p, t in zip(predictions, targets)]))
    if "rouge" in metrics:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
        scores = [scorer.score(t, p) for p, t in zip(predictions, targets)]
        out.update({k: float(np.mean([s[k].fmeasure for s in scores])) for k in ("rouge1", "rouge2", "rougeL")})
    if "bleu" in metrics or "chrf" in metrics:
        import sacrebleu

        if "bleu" in metrics:
            out["bleu"] = float(sacrebleu.corpus_bleu(predictions, [targets]).score)
        if "chrf" in metrics:
            out["chrf"] = float(sacrebleu.corpus_chrf(predictions, [targets]).score)
    return out


def run_generate(scorer: Scorer, spec: dict, rows: list[dict]) -> dict:
    prompts = [scorer.tokenizer.encode(_fill(spec["prompt"], row, spec["name"])) for row in rows]
    predictions = scorer.generate(prompts, int(spec.get("max_new_tokens", 32)), spec.get("stop", ["\n"]))
    targets = [str(row[spec["target"]]) for row in rows]
    return {**generation_metrics(predictions, targets, spec.get("metrics", ["exact_match"])),
            "samples": [{"prediction": p, "target": t} for p, t in list(zip(predictions, targets))[:5]]}


RUNNERS: dict[str, Callable] = {"multiple_choice": run_multiple_choice, "cloze": run_cloze,
                                "perplexity": run_perplexity, "generate": run_generate}


def evaluate_tasks(params, config, tokenizer, specs: list[dict], batch_size: int = 8,
                   progress: Optional[Callable[[str], None]] = None) -> dict:
    """{"tasks": {name: {"kind", "n", metrics…}}} for the model on each task."""
    from jaxgpt.evaluation.scoring import Scorer

    scorer = Scorer(params, config, tokenizer, batch_size)
    say = progress or (lambda msg: None)
    out = {}
    for i, spec in enumerate(specs):
        rows = spec["examples"][: spec.get("limit") or None]
        check_rows(spec, rows)
        say(f"[{i + 1}/{len(specs)}] {spec['name']} ({spec['kind']}, {len(rows)} examples)")
        result = RUNNERS[spec["kind"]](scorer, spec, rows)
        bad = [k for k, v in result.items() if isinstance(v, float) and math.isnan(v)]
        if bad:
            raise FloatingPointError(f"task {spec['name']!r}: {', '.join(bad)} is NaN: the model's weights hold or "
                                     "produce NaN/inf; evaluate an earlier checkpoint step")
        out[spec["name"]] = {"kind": spec["kind"], "n": len(rows), **result}
    return {"tasks": out}


def progress_to_stderr(msg: str) -> None:
    print(f"[evaluate] {msg}", file=sys.stderr, flush=True)


# --- named tasks made from the shared data sets (JAXGPT_DATA_DIR) -----------------------------------

def _sms_spam() -> dict:
    from jaxgpt.data.corpus import corpus_path

    rows = [line.split("\t", 1) for line in corpus_path("sms-spam").read_text(encoding="utf-8").splitlines() if "\t" in line]
    examples = [{"text": text, "choices": [" ham", " spam"], "gold": int(label == "spam")} for label, text in rows]
    return {"name": "sms-spam", "kind": "multiple_choice", "context": "Message: {text}\nSpam or ham? Answer:",
            "choices": "choices", "gold": "gold", "examples": examples[-500:], "limit": 500}


def _verdict_cloze() -> dict:
    from jaxgpt.data.corpus import corpus_path

    paragraphs = [" ".join(p.split()) for p in corpus_path("the-verdict").read_text(encoding="utf-8").split("\n\n")]
    return {"name": "the-verdict-cloze", "kind": "cloze", "text": "text",
            "examples": [{"text": p} for p in paragraphs if len(p.split()) >= 20]}


def _shakespeare_ppl() -> dict:
    from jaxgpt.data.corpus import corpus_path

    text = corpus_path("tinyshakespeare").read_text(encoding="utf-8")
    held_out = text[int(0.9 * len(text)):]  # the 90/10 split's validation part
    docs = [d for d in held_out.split("\n\n") if d.strip()]
    return {"name": "tinyshakespeare-ppl", "kind": "perplexity", "text": "text", "examples": [{"text": d} for d in docs],
            "limit": 200}


def _instruction_gen() -> dict:
    from jaxgpt.data.corpus import corpus_path
    from jaxgpt.data.instructions import RESPONSE_MARKER, book_split, format_input, load_instruction_data

    test = book_split(load_instruction_data(corpus_path("instruction-data")))[2]
    return {"name": "instruction-gen", "kind": "generate", "target": "output", "max_new_tokens": 64, "stop": ["\n\n"],
            "prompt": "{prompt}", "metrics": list(GENERATE_METRICS), "limit": 100,
            "examples": [{"prompt": format_input(e) + RESPONSE_MARKER, "output": e["output"]} for e in test]}


BUILTIN: dict[str, Callable[[], dict]] = {"sms-spam": _sms_spam, "the-verdict-cloze": _verdict_cloze,
                                          "tinyshakespeare-ppl": _shakespeare_ppl, "instruction-gen": _instruction_gen}
