"""Shared fixtures: the tiny random Llama (boots in well under a second once imported)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny():
    from depthlens.models import load_model

    return load_model("tiny-llama")


@pytest.fixture(scope="session")
def smol():
    """The real embedded default (marked-slow tests only)."""
    from depthlens.models import load_model

    return load_model("smollm2-135m-instruct")
