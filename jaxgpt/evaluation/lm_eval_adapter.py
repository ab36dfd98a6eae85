"""jaxgpt as a model type of EleutherAI's lm-evaluation-harness (the optional extra `eval`).

    python -m jaxgpt.evaluation.lm_eval_adapter --model jaxgpt --model_args checkpoint=runs/mine \\
        --tasks hellaswag,lambada_openai [--include_path my_tasks/] [--limit 100]

runs the harness's own command line after registering "jaxgpt" (`lm_eval --model jaxgpt` works the
same from any Python program that has imported this module). `model_args`: `checkpoint=DIR` (a
jaxgpt run) or `hf=DIR` (Hugging Face weights), or `preset=NAME` (a random model, for tests);
`batch_size`. The three requests are answered by `jaxgpt.evaluation.scoring.Scorer`, so the
harness's log-likelihoods are jaxgpt's own (tested).
"""

from __future__ import annotations

import sys
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from jaxgpt.evaluation.scoring import Scorer


def _load(checkpoint: Optional[str], hf: Optional[str], preset: Optional[str]):
    if sum(x is not None for x in (checkpoint, hf, preset)) != 1:
        raise ValueError("model_args needs exactly one of checkpoint=DIR, hf=DIR or preset=NAME")
    if checkpoint is not None:
        from jaxgpt.weights.checkpoint import load_for_inference

        return load_for_inference(checkpoint)
    if hf is not None:
        from jaxgpt.weights.hf import load_hf, load_tokenizer, resolve_checkpoint

        params, config = load_hf(hf)
        return params, config, load_tokenizer(resolve_checkpoint(hf), config)
    from jaxgpt.config import get_preset
    from jaxgpt.data.tokenizer import GPT2Tokenizer
    from jaxgpt.nn.model import init_params

    tokenizer = GPT2Tokenizer()
    config = get_preset(preset, vocab_size=tokenizer.vocab_size)
    return init_params(config), config, tokenizer


@register_model("jaxgpt")
class JaxgptLM(LM):
    def __init__(self, checkpoint: Optional[str] = None, hf: Optional[str] = None, preset: Optional[str] = None,
                 batch_size=8, max_gen_toks: int = 256, **unused) -> None:
        super().__init__()
        params, config, tokenizer = _load(checkpoint, hf, preset)
        self.scorer = Scorer(params, config, tokenizer, int(batch_size) if str(batch_size).isdigit() else 8)
        self.tokenizer, self.max_gen_toks = tokenizer, int(max_gen_toks)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation, tokenized together as the text will be (a space at
        the end of the context moves to the continuation, as the harness's HF model does)."""
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole, ctx = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
        if whole[:len(ctx)] != ctx:  # a merge across the boundary: score the pieces as tokenized apart
            return ctx, self.tokenizer.encode(continuation)
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood([self._split(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [self.scorer.rolling_loglikelihood(self.tokenizer.encode(r.args[0])) for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out += self.scorer.generate([self.tokenizer.encode(context)], int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                        until)
        return out


def main(argv=None) -> int:
    """The harness's command line, with "jaxgpt" registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
