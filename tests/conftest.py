"""Shared fixtures: the tiny random Llama (boots in well under a second once imported), and how
the suite is spread over processes.

``scripts/test.sh`` runs the suite on two processes (pytest-xdist, ``--dist loadgroup``). Every
test is put in a group that one process runs whole: the tests of one file together (so a
module-scoped fixture is built once), except the tests that need a real model (marked
``slow``), which form one group of their own, so the embedded default is loaded by one process
only. Without xdist the groups do nothing.
"""

from __future__ import annotations

import pytest
import torch

# Tests run tiny models: one thread avoids thread-pool overhead that dominates at this size
# (measured here: 7 ms vs 290 ms per tiny forward on a shared 2-core machine).
torch.set_num_threads(1)


REAL_MODEL_GROUP = "real-model"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(True for _ in item.iter_markers("xdist_group")):
            continue
        group = REAL_MODEL_GROUP if item.get_closest_marker("slow") else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def tiny():
    from depthlens.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smol():
    """The real embedded default (marked-slow tests only)."""
    from depthlens.models import load_model

    return load_model("smollm2-135m-instruct")
