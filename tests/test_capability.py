"""Capability through lm-evaluation-harness (the depthlens LM class, the shipped task) and hallucination (tiny-llama)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from depthlens.infra.results import read_run


@pytest.fixture(scope="module")
def tiny():
    from depthlens.models import load_model

    return load_model("tiny-llama")


def _req(kind, *args):
    from lm_eval.api.instance import Instance

    return Instance(kind, {}, tuple(args), 0)


def test_loglikelihood_is_the_sum_of_the_continuation_token_logprobs(tiny):
    from depthlens.runtime.lm_eval_model import DepthlensLM

    lm = DepthlensLM(model=tiny, batch_size=2)
    ctx, cont = "The sky is", " blue today"
    (lp, greedy), (lp_space, _), _ = lm.loglikelihood([_req("loglikelihood", ctx, cont),
                                                       _req("loglikelihood", ctx + " ", "blue today"),
                                                       _req("loglikelihood", "a much longer context here", " x")])
    tok = tiny.tokenizer
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    whole = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = F.log_softmax(tiny.plain()(torch.tensor([whole])).logits[0].float(), -1)
    want = sum(float(logp[t - 1, whole[t]]) for t in range(len(c), len(whole)))
    assert lp == pytest.approx(want, abs=1e-4) and lp_space == pytest.approx(want, abs=1e-4)  # batched, padded: same
    assert isinstance(greedy, bool)


def test_hooks_are_active_in_every_forward(tiny):
    from depthlens.models import hook_name
    from depthlens.runtime.lm_eval_model import DepthlensLM

    zero = [(hook_name("mlp_out", 1), lambda x, hook: torch.zeros_like(x))]
    req = [_req("loglikelihood", "The sky is", " blue")]
    plain = DepthlensLM(model=tiny).loglikelihood(req)[0][0]
    hooked = DepthlensLM(model=tiny, fwd_hooks=zero).loglikelihood(req)[0][0]
    ids = torch.tensor([tiny.tokenizer("The sky is blue", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), tiny.bridge.hooks(fwd_hooks=zero):
        logp = F.log_softmax(tiny.bridge(ids)[0].float(), -1)
    n = len(tiny.tokenizer("The sky is", add_special_tokens=False)["input_ids"])
    want = sum(float(logp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))
    assert hooked != pytest.approx(plain, abs=1e-3) and hooked == pytest.approx(want, abs=1e-3)
    assert not tiny.has_hooks()


def test_generate_until_stops_at_the_stop_string(tiny):
    from depthlens.runtime.lm_eval_model import DepthlensLM

    lm = DepthlensLM(model=tiny)
    free = lm.generate_until([_req("generate_until", "Q: what?\nA:", {"until": [], "max_gen_toks": 6})])[0]
    stop = free[2:4] if len(free) >= 4 else free[-1:]
    cut = lm.generate_until([_req("generate_until", "Q: what?\nA:", {"until": [stop], "max_gen_toks": 6})])[0]
    assert stop not in cut and free.startswith(cut)


def test_the_primality_task_is_balanced_and_its_composites_are_not_trivial():
    from depthlens.data.lm_eval_tasks import is_prime, primality_docs

    docs = primality_docs()
    assert len(docs) == 1000 and sum(d["label"] for d in docs) == 500
    for d in docs:
        n = d["number"]
        assert is_prime(n) == (d["label"] == 0) and n % 2 and (d["label"] == 0 or (n % 3 and n % 5))
    assert [is_prime(n) for n in (2, 9, 97, 221)] == [True, False, True, False]


def test_answer_classes_follow_the_ground_truth():
    from analyses.capability import answer_class

    assert answer_class("Yes, 7411 is prime.", True) == "correct"
    assert answer_class("No, it is not.", True) == "hallucination"
    assert answer_class("7411 is not a prime number", True) == "hallucination"
    assert answer_class("Yes, there was: John Smith.", False) == "hallucination"
    assert answer_class("There was indeed a senator", False) == "hallucination"
    assert answer_class("No, there is no such senator.", False) == "correct"
    assert answer_class("I am not sure.", False) == "other"


def test_capability_quick_runs_the_shipped_task_through_lm_eval(tmp_path):
    from analyses.capability import main

    rec = read_run(main(["--model", "tiny-llama", "--quick", "--out", str(tmp_path)]))
    row = next(r for r in rec.tables["tasks"] if r["task"] == "depthlens_primality" and r["metric"] == "acc")
    assert row["n"] == 8 and row["value"] == pytest.approx(row["lm_eval_value"]) and row["interval"] == "wilson"
    assert row["lo"] <= row["value"] <= row["hi"]
    assert len(rec.metrics["per_doc"]["depthlens_primality"]["acc"]) == 8
    hall = {r["set"]: r for r in rec.tables["hallucination"]}
    assert set(hall) == {"primality_testing", "senator_search", "graph_connectivity", "all"} and hall["all"]["n"] == 12
    for r in hall.values():
        assert r["hallucination"] + r["accuracy"] + r["other"] == pytest.approx(1.0)
    assert rec.metrics["lm_eval_version"].startswith("0.4")


def test_capability_rejects_an_unknown_task(capsys):
    from analyses.capability import main

    with pytest.raises(SystemExit) as exc:
        main(["--model", "tiny-llama", "--tasks", "no_such_task", "--no-hallucination"])
    assert exc.value.code == 2 and "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err


def test_a_hook_without_a_plain_equivalent_runs_through_the_bridge(tiny):
    from depthlens.runtime.lm_eval_model import DepthlensLM

    zero_v = [("blocks.1.attn.v.hook_out", lambda x, hook: torch.zeros_like(x))]
    req = [_req("loglikelihood", "The sky is", " blue")]
    lm = DepthlensLM(model=tiny, fwd_hooks=zero_v)
    ids = torch.tensor([tiny.tokenizer("The sky is blue", add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), tiny.bridge.hooks(fwd_hooks=zero_v):
        logp = F.log_softmax(tiny.bridge(ids)[0].float(), -1)
    n = len(tiny.tokenizer("The sky is", add_special_tokens=False)["input_ids"])
    want = sum(float(logp[t - 1, ids[0, t]]) for t in range(n, ids.shape[1]))
    got = lm.loglikelihood(req)[0][0]
    assert lm._bridge and got == pytest.approx(want, abs=1e-3)
    assert got != pytest.approx(DepthlensLM(model=tiny).loglikelihood(req)[0][0], abs=1e-3)
