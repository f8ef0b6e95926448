"""The vllm engine against the hf engine on the same weights: tokens, log-probs, seeds, adapters, ledger.

Float32 on both sides; vLLM's kernels sum in another order than transformers', so a greedy tie broken by
the last bits may go the other way: the parity bar is 90% of views token for token (the rest reported).
"""

from __future__ import annotations

import json

import pytest
import torch

from dits.engine.base import SamplingParams
from dits.mas.protocol import ProtocolConfig, render_view, turn_prefix
from dits.seeding import derive_seed
from dits.tasks.builtin import make_builtin

pytestmark = pytest.mark.slow


def _views() -> list:
    """16+ protocol views of different lengths: both datasets, both speakers, 0-2 earlier turns."""
    cfg = ProtocolConfig()
    turns = ["I know that Zorvath lives in Melbrook.", "<A>Melbrook</A>"]
    views = []
    for ds in ("facts", "arith"):
        for k, ex in enumerate(make_builtin(ds, "dev", 9, seed=3)):
            n = k % 3
            views.append(render_view(ex, turns[:n], n % 2, cfg))
    return views


def test_greedy_generations_equal_hf_token_for_token(engine, vllm_engine):
    views = _views()
    assert len(views) >= 16 and len({len(engine.encode_view(v)) for v in views}) >= 8
    sp = SamplingParams(max_new_tokens=32, prefix=turn_prefix(0, ProtocolConfig()))
    ours = [c[0] for c in vllm_engine.generate(views, sp)]
    ref = [c[0] for c in engine.generate(views, sp)]
    same = [a.token_ids == b.token_ids for a, b in zip(ours, ref, strict=True)]
    pairs = list(zip(ours, ref, strict=True))
    diverged = [(i, _first_difference(a.token_ids, b.token_ids)) for i, (a, b) in enumerate(pairs)]
    diverged = [d for d, s in zip(diverged, same, strict=True) if not s]
    assert sum(same) >= 0.9 * len(views), f"views that diverged (index, first differing token): {diverged}"
    for a, b, s in zip(ours, ref, same, strict=True):
        if s:
            assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
            assert a.generated_tokens == b.generated_tokens


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_score_logprobs_equal_hf(engine, vllm_engine):
    views = _views()[:6]
    comps = ["Zorvath lives in Melbrook.", "<A>12</A>", "I do not know.", "", "Alice: hi", "x " * 20]
    ours = vllm_engine.score(views, comps, prefix="Alice:")
    ref = engine.score(views, comps, prefix="Alice:")
    for a, b in zip(ours, ref, strict=True):
        assert a.token_ids == b.token_ids
        assert len(a.logprobs) == len(a.token_ids)
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3)
    with pytest.raises(ValueError, match="temperature 1 only"):  # vLLM's prompt log-probs are untempered
        vllm_engine.score(views[:1], comps[:1], temperature=0.7)
    alone_a = vllm_engine.score_alone(comps[:3], prefix="Bob:")
    alone_b = engine.score_alone(comps[:3], prefix="Bob:")
    for a, b in zip(alone_a, alone_b, strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3)


def test_seeded_sample_does_not_depend_on_its_batch(vllm_engine):
    views = _views()[:8]
    sp = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_new_tokens=24, seed=11)
    batched = vllm_engine.generate(views, sp)
    alone = vllm_engine.generate([views[5]], sp, seeds=[derive_seed(11, 5)])[0]
    assert [c.token_ids for c in batched[5]] == [c.token_ids for c in alone]
    assert batched[5][0].token_ids != batched[5][1].token_ids  # the two samples have their own seeds


def test_stop_strings_and_prefix_behave_as_hf(engine, vllm_engine):
    views = _views()[6:12]
    for sp in (
        SamplingParams(max_new_tokens=40, stop=("\n", "."), prefix="Bob:"),
        SamplingParams(max_new_tokens=40, stop=("<A>",)),
    ):
        ours = [c[0] for c in vllm_engine.generate(views, sp)]
        ref = [c[0] for c in engine.generate(views, sp)]
        pairs = zip(ours, ref, strict=True)
        agree = [(a.text, a.finish_reason) == (b.text, b.finish_reason) for a, b in pairs]
        assert sum(agree) >= 0.8 * len(views)
        for a in ours:
            assert not any(s in a.text for s in sp.stop)
            assert not a.text.startswith(sp.prefix) or not sp.prefix


def test_ledger_counts_equal_the_tokens(vllm_engine):
    views = _views()[:5]
    sp = SamplingParams(n=2, temperature=0.8, max_new_tokens=16, seed=2)
    before = vllm_engine.ledger.snapshot()
    out = vllm_engine.generate(views, sp)
    spent = vllm_engine.ledger.snapshot() - before
    assert spent.prompt_tokens == 2 * sum(len(vllm_engine.prompts.encode_view(v)) for v in views)
    assert spent.generated_tokens == sum(c.generated_tokens for cs in out for c in cs)
    assert all(c.generated_tokens - len(c.token_ids) in (0, 1) for cs in out for c in cs)
    # The second sample of each view, and a repeat of the call, read the prompt's blocks from the cache.
    assert 0 < spent.cached_tokens <= spent.prompt_tokens
    comps = ["one two three", "four"]
    before = vllm_engine.ledger.snapshot()
    vllm_engine.score(views[:2], comps)
    spent = vllm_engine.ledger.snapshot() - before
    assert spent.scored_tokens == sum(vllm_engine.count_tokens(c) for c in comps)
    assert spent.prompt_tokens == sum(len(vllm_engine.prompts.encode_view(v)) for v in views[:2])
    assert spent.generated_tokens == 0


def _save_random_lora(engine, path, seed: int) -> None:
    """A PEFT LoRA with random A and B (as after training), saved the way the train stage saves one."""
    from peft import LoraConfig

    targets = ["q_proj", "v_proj", "o_proj"]
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    engine.add_adapter("probe", cfg, seed=seed)
    try:
        with torch.no_grad():
            for p in engine.adapter_parameters("probe").values():
                p.mul_(0.5)
        engine.model.save_pretrained(str(path), selected_adapters=["probe"])
    finally:
        engine.delete_adapter("probe")


def test_lora_changes_vllm_output_as_it_changes_hf(engine, vllm_engine, tmp_path):
    views = _views()[:8]
    sp = SamplingParams(max_new_tokens=20)
    plain = [c[0].token_ids for c in vllm_engine.generate(views, sp)]
    results = []
    for seed in (1, 2):  # the second adapter is a retrained version saved to the same place, same name
        _save_random_lora(engine, tmp_path, seed)
        saved = tmp_path / "probe" if (tmp_path / "probe").is_dir() else tmp_path
        assert json.loads((saved / "adapter_config.json").read_text())["r"] == 8
        engine.load_adapter("lineage", str(saved))
        vllm_engine.load_adapter("lineage", str(saved))
        engine.set_adapter("lineage")
        vllm_engine.set_adapter("lineage")
        try:
            ref = [c[0].token_ids for c in engine.generate(views, sp)]
            ours = [c[0].token_ids for c in vllm_engine.generate(views, sp)]
        finally:
            engine.set_adapter(None)
            engine.delete_adapter("lineage")
            vllm_engine.set_adapter(None)
        assert sum(a == b for a, b in zip(ours, ref, strict=True)) >= 0.9 * len(views)
        assert sum(a != b for a, b in zip(ours, plain, strict=True)) >= len(views) // 2  # the adapter acts
        results.append(ours)
    assert results[0] != results[1]  # the retrained weights are served, not the cached first version
    vllm_engine.delete_adapter("lineage")
    assert [c[0].token_ids for c in vllm_engine.generate(views, sp)] == plain


def test_adapter_the_engine_cannot_serve_is_refused(vllm_engine, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["lm_head"]}))
    with pytest.raises(ValueError, match="lm_head"):
        vllm_engine.load_adapter("bad", str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 512, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="max_lora_rank"):
        vllm_engine.load_adapter("bad", str(tmp_path))


def test_a_run_generates_on_vllm_and_trains_on_the_hf_policy(engine, vllm_engine, tmp_path):
    """A tiny idpo run with ``engine.backend: vllm``: search and evaluation on vLLM, DPO on the hf policy
    (charged to the same ledger), the trained adapter hot-loaded into vLLM, which then answers as the hf
    engine does with that adapter."""
    from dits.artifacts import read_jsonl
    from dits.config import parse_config
    from dits.evaluate import EvalRecord
    from dits.pipeline import Pipeline
    from dits.stages.evaluate import evaluate_to_dir
    from dits.tasks.source import examples_for
    from tests.helpers import TINY

    spec = {**TINY, "engine": {"backend": "vllm", "dtype": "float32"}}
    spec["pipeline"] = {"recipe": "idpo", "iterations": 1, "methods": ["q", "mix"]}
    cfg = parse_config(spec)
    pipe = Pipeline(cfg, tmp_path, engine=vllm_engine, progress=False)
    pipe.run()
    run = tmp_path / "tiny"
    policy = pipe.ctx.holder._policy
    assert policy is not None and policy is not vllm_engine and policy.ledger is vllm_engine.ledger
    dpo = json.loads((run / "iter_0/dpo-mix/manifest.json").read_text())
    assert dpo["counts"]["trained"] == 1 and dpo["ledger"]["trained_tokens"] > 0
    search = json.loads((run / "iter_0/search/manifest.json").read_text())
    assert search["ledger"]["generated_tokens"] > 0 and search["ledger"]["cached_tokens"] > 0
    # The adapter vLLM served in evaluate-mix is the one DPO trained: hf with it gives the same transcripts.
    assert set(vllm_engine.adapter_names()) & set(policy.adapter_names())  # trained there, served here
    engine.load_adapter("dpo-mix", str(run / "iter_0/dpo-mix"))
    engine.set_adapter("dpo-mix")
    try:
        test = examples_for(cfg.task, "test")
        evaluate_to_dir(engine, test, "mas", cfg.protocol, tmp_path / "hf-eval", progress=False)
    finally:
        engine.set_adapter(None)
        engine.delete_adapter("dpo-mix")
    ours = [r.transcript.turns for r in read_jsonl(run / "iter_0/evaluate-mix/transcripts.jsonl", EvalRecord)]
    ref = [r.transcript.turns for r in read_jsonl(tmp_path / "hf-eval/transcripts.jsonl", EvalRecord)]
    assert len(ours) == len(test) and sum(a == b for a, b in zip(ours, ref, strict=True)) >= len(test) - 1
