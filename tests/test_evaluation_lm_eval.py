"""The lm-evaluation-harness adapter: a local task in the harness's own format runs offline through
`lm_eval.simple_evaluate`, and the log-likelihoods the harness records are jaxgpt's own scorer's."""

import json

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")  # the optional extra `eval` (installed with the test extra)


def test_a_local_harness_task_and_the_scores_it_records(tmp_path, monkeypatch):
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    from jaxgpt.evaluation.lm_eval_adapter import JaxgptLM

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rows = [{"question": f"Is {i} even?", "choices": [" yes", " no"], "gold": i % 2} for i in range(6)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'data.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    model = JaxgptLM(preset="test", batch_size=4)
    out = lm_eval.simple_evaluate(model=model, tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(tmp_path)),
                                  log_samples=True)
    assert 0.0 <= out["results"]["tiny_mc"]["acc,none"] <= 1.0
    samples = out["samples"]["tiny_mc"]
    assert len(samples) == 6
    tok, scorer = model.tokenizer, model.scorer
    for s in samples:  # each choice's request as the harness built it: (context, delimiter + choice)
        assert [c for _, c in s["arguments"]] == ["  yes", "  no"]
        ours = scorer.loglikelihood([model._split(ctx, cont) for ctx, cont in s["arguments"]])
        recorded = [r[0] for r in s["resps"]]  # what the adapter answered the harness, per choice
        np.testing.assert_allclose([float(r[0]) for r in recorded], [lp for lp, _ in ours], rtol=1e-6)
        ids = tok.encode(s["arguments"][0][0] + s["arguments"][0][1])  # and the split is the joint tokenization's
        assert sum(model._split(*s["arguments"][0]), []) == ids
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=("the cat sat on the mat",), idx=0)
    assert model.loglikelihood_rolling([req])[0] == pytest.approx(scorer.rolling_loglikelihood(tok.encode("the cat sat on the mat")))
    gen = Instance(request_type="generate_until", doc={}, arguments=("the cat", {"until": ["\n"], "max_gen_toks": 4}), idx=0)
    assert model.generate_until([gen]) == scorer.generate([tok.encode("the cat")], 4, ["\n"])
    with pytest.raises(ValueError, match="exactly one of"):
        JaxgptLM()
