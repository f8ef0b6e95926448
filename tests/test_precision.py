"""Mixed precision: ``engine.dtype: auto``, float32 trainable weights under bf16 compute, and the places
where bf16 must not be used (the shared-prefix attention's softmax)."""

from __future__ import annotations

import types

import pytest
import torch

from dits.engine import precision
from tests.helpers import DPO_PAIRS
from tests.threads import one_torch_thread

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra}
bugs\t\t: spectre_v1
"""


@pytest.mark.parametrize(
    ("extra", "found"),
    [
        ("", set()),
        ("avx512_bf16", {"avx512_bf16"}),
        ("amx_tile amx_bf16 amx_int8", {"amx_bf16"}),
        ("avx512_vnni", set()),  # a neighbouring flag is not bf16
    ],
)
def test_bf16_flags_are_read_from_the_flags_line(extra, found):
    assert precision.bf16_flags_in(CPUINFO.format(extra=extra)) == frozenset(found)
    assert precision.bf16_flags_in("bugs\t: avx512_bf16\n") == frozenset()  # only the flags line counts


def test_auto_resolves_by_the_cpu_detector(monkeypatch):
    from dits.config import load_config
    from dits.engine.config import EngineConfig

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert EngineConfig(device="cpu").dtype == "float32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert EngineConfig(device="cpu").dtype == "bfloat16"
    assert EngineConfig(device="cpu", dtype="float32").dtype == "float32"  # an explicit dtype is kept
    cfg = load_config(None, {"engine.device": "cpu"})
    assert cfg.engine.dtype == "bfloat16" and "dtype: bfloat16" in cfg.to_yaml()  # a run records it
    assert precision.weights_dtype("bfloat16", trainable_base=True) == "float32"
    assert precision.weights_dtype("bfloat16", trainable_base=False) == "bfloat16"
    assert precision.weights_dtype("float32", trainable_base=True) == "float32"


def test_shared_prefix_attention_in_bf16_equals_eager_attention():
    """Against transformers' eager attention (scores in the compute dtype, softmax in float32) over the
    prefix and suffix KV concatenated, with padded rows: equal within one bf16 spacing of the output in
    bf16, and to float32 rounding in float32."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from dits.engine.shared_prefix import SharedPrefix, _attention, suffix_mask

    gen = torch.Generator().manual_seed(0)
    b, h, hkv, d, p, s = 3, 9, 3, 64, 700, 12
    q_len = s
    q = torch.randn(b, h, q_len, d, generator=gen) * 2
    kp, vp = torch.randn(hkv, p, d, generator=gen) * 2, torch.randn(hkv, p, d, generator=gen)
    ks, vs = torch.randn(b, hkv, s, d, generator=gen) * 2, torch.randn(b, hkv, s, d, generator=gen)
    attn = torch.ones(b, s, dtype=torch.long)
    attn[0, :3] = 0
    attn[1, :5] = 0  # left padding
    mask = suffix_mask(attn, q_len)
    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=h // hkv, training=False)

    def ours(dt: torch.dtype) -> torch.Tensor:
        prefix = SharedPrefix([(kp.to(dt), vp.to(dt))])
        out, _ = _attention(
            module, q.to(dt), ks.to(dt), vs.to(dt), mask, scaling=d**-0.5, shared_prefix=prefix
        )
        assert out.dtype == dt
        return out.double()

    def eager(dt: torch.dtype) -> torch.Tensor:
        k = torch.cat([kp.expand(b, hkv, p, d), ks], 2).to(dt)
        v = torch.cat([vp.expand(b, hkv, p, d), vs], 2).to(dt)
        seen = torch.cat([torch.ones(b, 1, q_len, p, dtype=torch.bool), mask.expand(b, 1, q_len, s)], -1)
        additive = torch.zeros(seen.shape, dtype=dt).masked_fill(~seen, torch.finfo(dt).min)
        out, _ = eager_attention_forward(module, q.to(dt), k, v, additive, scaling=d**-0.5)
        return out.double()

    exact = eager(torch.float64)
    assert (ours(torch.float32) - exact).abs().max() < 1e-5
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().max())) - 7)  # bf16 spacing at the output's scale
    assert (ours(torch.bfloat16) - eager(torch.bfloat16)).abs().max() <= ulp
    # and no further from the exact result, on average, than eager's own bf16 rounding (+25%)
    err_ours = (ours(torch.bfloat16) - exact).abs().mean()
    err_eager = (eager(torch.bfloat16) - exact).abs().mean()
    assert err_ours <= 1.25 * err_eager


# ------------------------------------------------------------------------------- training steps


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for _, t in sorted(tensors.items())])


def _dpo_step(engine, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the applied update, the update AdamW's first step prescribes from the step's clipped gradient:
    ``-lr · g / (|g| + eps)`` per entry, as a float32 weight holds it) of one DPO step at the paper's full
    fine-tuning lr of 5e-7, on the weights being trained: every base weight (full) or a fresh LoRA seeded
    alike (its B; A gets no gradient while B = 0)."""
    from transformers import TrainerCallback

    from dits.train import TrainConfig
    from dits.train.dpo import dpo_trainer
    from dits.train.staging import TRAIN_ADAPTER

    lr = 5e-7
    cfg = TrainConfig.model_validate(
        {"full_finetune": full, "dpo": {"lr": lr, "batch_size": 2, "max_steps": 1}}
    )
    grads: dict[str, torch.Tensor] = {}
    before: dict[str, torch.Tensor] = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):  # after the backward, before the step
            for n, t in trained().items():
                grads[n] = t.grad.detach().double().clone()
                before[n] = t.detach().double().clone()

    with dpo_trainer(engine, DPO_PAIRS, cfg) as trainer:

        def trained() -> dict[str, torch.nn.Parameter]:
            if full:
                return dict(engine.base.named_parameters())
            return engine.adapter_parameters(TRAIN_ADAPTER)

        assert all(t.dtype == torch.float32 for t in trained().values())  # master weights / fp32 adapter
        trainer.add_callback(Capture())
        trainer.train()
        after = {n: t.detach().double() for n, t in trained().items()}
    eps = trainer.args.adam_epsilon

    def on_float32(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:  # what a float32 weight can hold
        return (w.float() + delta.float()).double() - w

    applied = _flat({n: after[n] - before[n] for n in after})
    prescribed = _flat({n: on_float32(before[n], -lr * g / (g.abs() + eps)) for n, g in grads.items()})
    return applied, prescribed


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.slow
@pytest.mark.parametrize("full", [True, False], ids=["full", "lora"])
def test_a_bf16_dpo_step_at_lr_5e_7_moves_the_weights_as_float32_does(full):
    """bf16 compute must not round the update away (in pure bf16 99.7% of the entries of this full step
    stayed unchanged: cosine 0.03 with the float32 step, 5% of its norm). The applied update equals
    what AdamW prescribes from the gradient to 1e-2 relative error; against the step computed wholly in
    float32 it is the same step up to the gradient's own bf16 noise (the gradients differ by ~12% in
    norm, so AdamW's sign-like first step flips ~1% of the entries): cosine >= 0.95, norm within 1%."""
    from dits.engine.hf import HFEngine

    with one_torch_thread():
        ref_engine = HFEngine("smollm2-135m", dtype="float32")
        ref, ref_prescribed = _dpo_step(ref_engine, full)
        del ref_engine
        engine = HFEngine("smollm2-135m", dtype="bfloat16", trainable_base=full)
        assert engine.weights_dtype == ("float32" if full else "bfloat16")
        mixed, prescribed = _dpo_step(engine, full)
    nonzero = ref != 0
    assert nonzero.sum() > 1000
    for applied, wanted in ((ref, ref_prescribed), (mixed, prescribed)):
        rel = (applied - wanted)[nonzero].norm() / wanted[nonzero].norm()
        assert rel <= 1e-2, rel
    assert _cos(mixed, ref) >= 0.95
    assert abs(mixed.norm() / ref.norm() - 1) <= 0.01


def test_master_weight_engine_computes_in_bf16_close_to_float32(engine):
    """Full fine-tuning's engine (float32 weights, forwards under bf16 autocast): its generation and scoring,
    shared-prefix attention included, agree with the float32 engine up to bf16 rounding — and do round
    (were autocast off, they would equal float32 exactly)."""
    from dits.engine.base import SamplingParams
    from dits.engine.hf import HFEngine
    from dits.mas.protocol import ProtocolConfig, render_view
    from dits.tasks.builtin import make_builtin

    with one_torch_thread():
        mixed = HFEngine("smollm2-135m", dtype="bfloat16", trainable_base=True, max_batch=16)
        assert {p.dtype for p in mixed.base.parameters()} == {torch.float32}
        views = [render_view(ex, [], 0, ProtocolConfig()) for ex in make_builtin("facts", "test", 12)]
        greedy = SamplingParams(max_new_tokens=12)
        texts = {
            name: [c[0].text for c in e.generate(views, greedy)]
            for name, e in (("f32", engine), ("mp", mixed))
        }
        same = sum(a == b for a, b in zip(texts["f32"], texts["mp"], strict=True))
        assert same >= 8, texts  # greedy decoding diverges where two tokens are within bf16 rounding
        lp = {name: e.score(views, texts["f32"]) for name, e in (("f32", engine), ("mp", mixed))}
    diffs = torch.tensor(
        [
            a - b
            for x, y in zip(lp["f32"], lp["mp"], strict=True)
            for a, b in zip(x.logprobs, y.logprobs, strict=True)
        ]
    )
    assert 0 < diffs.abs().mean() < 0.05 and diffs.abs().max() < 1.0
