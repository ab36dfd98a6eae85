"""The attention arena: variants judged the way a reviewer would accept (docs/arena.md).

`jaxgpt arena SWEEP.toml --out DIR` trains every variant × seed × task of a sweep on the same data
order and token budget, evaluates each model at its training length and beyond, measures what it
costs, and writes `results.json`, `report.md` and plots with means, 95 % intervals and Welch
t-tests against the sweep's baseline.

- `tasks/`: the generated tasks (associative recall, induction, passkey, selective copying) and
  the language-modelling tasks, each with its generator, metric and hand-built solution;
- `sweep.py`: the sweep file, its validation, and the matched-parameters/FLOPs widths;
- `run.py`: one run (train, evaluate at L … 8L) in its own directory, skipped once finished;
- `cost.py`: parameters, FLOPs per token, KV bytes, throughputs and peak memory of a variant;
- `stats.py`: means, confidence intervals and Welch t-tests; `report.py`: the report and plots.
"""
