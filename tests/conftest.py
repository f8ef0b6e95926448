"""Shared fixtures: one embedded-model engine per test session (loading costs seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def engine():
    from dits.engine.hf import HFEngine

    return HFEngine("smollm2-135m", token_budget=8192, max_batch=16)
