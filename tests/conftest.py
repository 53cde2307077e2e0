"""Shared fixtures: the tiny random Llama (boots in well under a second once imported)."""

from __future__ import annotations

import pytest
import torch

# Tests run tiny models: one thread avoids thread-pool overhead that dominates at this size
# (measured here: 7 ms vs 290 ms per tiny forward on a shared 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny():
    from depthlens.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smol():
    """The real embedded default (marked-slow tests only)."""
    from depthlens.models import load_model

    return load_model("smollm2-135m-instruct")
