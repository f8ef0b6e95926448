"""SFT / DPO on TRL + PEFT and the one-step DPO probe, on the embedded model (tiny rows, at most 2 steps).

Every test leaves the shared engine as it found it: no adapter active that was not active before, the
adapters it loaded deleted, ``engine.base`` without TRL's patches.
"""

from __future__ import annotations

import uuid

import pytest
import torch

from tests.helpers import DPO_PAIRS, V_KELO, V_SUM, make_pair
from tests.threads import one_torch_thread

V_LONG = [
    {"role": "system", "content": "You are Bob. Give the answer as <A>answer</A>."},
    {"role": "user", "content": "Question: Where does Kelo live?\nYour notes:\n" + "Kelo likes tea. " * 40},
]


LONG_PAIR = make_pair(2, V_LONG, "<A>Varn</A>", "No idea.")
SFT_ROWS = [
    {"prompt": V_SUM, "completion": [{"role": "assistant", "content": "2 + 3 = 5. <A>5</A>"}]},
    {"prompt": V_KELO, "completion": [{"role": "assistant", "content": "Kelo lives in Varn. <A>Varn</A>"}]},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _name(tag: str) -> str:
    return f"t_{tag}_{uuid.uuid4().hex[:6]}"


def _cfg(dpo: dict | None = None, **phase):
    from dits.train import TrainConfig

    base = {"batch_size": 2, "epochs": 2, "max_steps": 2}
    return TrainConfig.model_validate(
        {
            "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "sft": {**base, "lr": 2e-3, **phase},
            "dpo": {**base, "lr": 5e-3, **phase, **(dpo or {})},
        }
    )


def _drop_adapter(engine, name: str) -> None:
    if name in engine.adapter_names():
        engine.delete_adapter(name)


def _adapters(engine) -> list[str]:
    return sorted(engine.adapter_names())


@pytest.fixture
def noisy_adapter(engine):
    """A loaded LoRA adapter that is not the identity ("reference = base" and "= start" then differ)."""
    from peft import LoraConfig

    name = _name("noisy")
    # PEFT draws lora_A from the global generator: seeded, so every run starts from the same adapter
    # (unseeded, the margin test failed in 1 of 5 runs here).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        engine.add_adapter(name, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in engine.adapter_parameters(name).items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    engine.model.eval()
    previous = engine.active_adapter
    yield name
    engine.set_adapter(previous if previous != name else None)
    _drop_adapter(engine, name)


def _turn_logps(engine, adapter: str | None, pairs) -> tuple[torch.Tensor, torch.Tensor]:
    from dits.train.step import reference_logps

    before = engine.active_adapter
    engine.set_adapter(adapter)
    try:
        return reference_logps(engine, pairs)
    finally:
        engine.set_adapter(before)


def _independent_tokens(engine, prompt, completions) -> int:
    """Tokens of prompt + each completion through the chat template, counted here without TRL."""
    tok = engine.tokenizer
    total = 0
    for c in completions:
        text = tok.apply_chat_template([*prompt, *c], tokenize=False)
        total += len(tok(text, add_special_tokens=False)["input_ids"])
    return total


def _shared_prompt_tokens(engine, prompt) -> int:
    """What two rows with this prompt share in one forward: the prompt (through the assistant header), all
    but its last token, which predicts each row's first completion token."""
    tok = engine.tokenizer
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"]) - 1


# --------------------------------------------------------------------------------------------- config


def test_config_defaults_and_validation():
    from pydantic import ValidationError

    from dits.train import TrainConfig

    cfg = TrainConfig()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16, 0.0)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.dpo.beta == 0.1 and cfg.sft.max_length is None and not cfg.full_finetune
    assert cfg.lora.to_peft().r == 8
    ref = TrainConfig.reference("debate")
    assert ref.full_finetune and ref.sft.lr == 1e-6 and ref.dpo.lr == 5e-7
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"dpo": {"betta": 0.2}})
    with pytest.raises(ValidationError):
        TrainConfig.model_validate({"sft": {"on_truncation": "cut"}})


# --------------------------------------------------------------------------------------------- lengths


def test_length_check_drops_or_names_the_long_pair(engine):
    from dits.train.dpo import check_dpo_lengths, train_dpo
    from dits.train.rows import TruncationError

    pairs = [*DPO_PAIRS, LONG_PAIR]
    full = check_dpo_lengths(engine.tokenizer, pairs, _cfg())
    assert full.dropped == [] and full.kept == [0, 1, 2]  # default: the longest pair sets the limit
    long_len = _independent_tokens(engine, V_LONG, [[{"role": "assistant", "content": "<A>Varn</A>"}]])
    assert full.max_length >= long_len

    short = max(
        _independent_tokens(engine, p.prompt, [[{"role": "assistant", "content": c}]])
        for p in DPO_PAIRS
        for c in (p.chosen, p.rejected)
    )
    assert short < long_len
    cfg = _cfg(max_length=short)
    check = check_dpo_lengths(engine.tokenizer, pairs, cfg)
    assert check.kept == [0, 1] and len(check.dropped) == 1
    assert (
        check.dropped[0].startswith("pair 2 (tree task2 node n2)")
        and f"> max_length {short}" in check.dropped[0]
    )

    prompt_cfg = _cfg(dpo={"max_prompt_length": 100})
    assert check_dpo_lengths(engine.tokenizer, pairs, prompt_cfg).kept == [0, 1]

    before = (_adapters(engine), engine.active_adapter, engine.ledger.snapshot())
    with pytest.raises(TruncationError, match=r"pair 2 \(tree task2 node n2\)"):
        train_dpo(engine, pairs, _cfg(max_length=short, on_truncation="error"), "/nonexistent/never-written")
    assert (_adapters(engine), engine.active_adapter, engine.ledger.snapshot()) == before


# --------------------------------------------------------------------------------------------- SFT


@pytest.mark.slow
def test_sft_masks_the_prompt_raises_completion_logprob_and_charges_tokens(engine, tmp_path):
    from dits.train.rows import chat_ids
    from dits.train.sft import sft_trainer, train_sft

    cfg = _cfg()
    views = [r["prompt"] for r in SFT_ROWS]
    texts = [
        engine.tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in SFT_ROWS
    ]
    heads = [
        engine.tokenizer.apply_chat_template(v, add_generation_prompt=True, tokenize=False) for v in views
    ]
    turns = [t[len(h) :] for t, h in zip(texts, heads, strict=True)]  # content + end-of-turn
    engine.set_adapter(None)
    base = [sum(s.logprobs) for s in engine.score(views, turns)]
    adapters_before = _adapters(engine)

    with sft_trainer(engine, SFT_ROWS, cfg) as trainer:  # inspect TRL's labels, then leave untrained
        for i, row in enumerate(SFT_ROWS):
            ex = trainer.train_dataset[i]
            n_prompt = len(chat_ids(engine.tokenizer, row["prompt"], add_generation_prompt=True))
            assert ex["input_ids"] == chat_ids(engine.tokenizer, row["prompt"] + row["completion"])
            assert all(lab == -100 for lab in ex["labels"][:n_prompt])  # no loss on the prompt
            assert ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]  # loss on every completion token
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        assert ((batch["labels"] != -100) <= batch["attention_mask"].bool()).all()  # padding carries no loss
    assert _adapters(engine) == adapters_before and "forward" not in engine.base.__dict__

    name = _name("sft")
    ledger_before = engine.ledger.snapshot()
    try:
        result = train_sft(engine, SFT_ROWS, cfg, tmp_path / "sft", adapter_name=name)
        assert engine.active_adapter is None and _adapters(engine) == sorted([*adapters_before, name])
        assert (tmp_path / "sft" / "adapter_model.safetensors").is_file()
        assert (tmp_path / "sft" / "train_result.json").is_file()
        assert result.steps == 2 and result.truncated == 0 and len(result.loss_history) == 2
        # two epochs of both rows, every non-padding token, counted without TRL:
        expected = 2 * sum(_independent_tokens(engine, r["prompt"], [r["completion"]]) for r in SFT_ROWS)
        assert result.trained_tokens == expected
        assert (engine.ledger.snapshot() - ledger_before).trained_tokens == expected
        engine.set_adapter(name)
        trained = [sum(s.logprobs) for s in engine.score(views, turns)]
        engine.set_adapter(None)
        assert all(t > b + 0.5 for t, b in zip(trained, base, strict=True)), (base, trained)
        assert [sum(s.logprobs) for s in engine.score(views, turns)] == base  # the base is untouched
    finally:
        _drop_adapter(engine, name)


# --------------------------------------------------------------------------------------------- DPO


@pytest.mark.slow
def test_dpo_from_an_adapter_raises_the_margin_against_that_adapter(engine, noisy_adapter, tmp_path):
    from dits.train.dpo import check_dpo_lengths, train_dpo

    pairs = [*DPO_PAIRS, LONG_PAIR]
    short = check_dpo_lengths(engine.tokenizer, DPO_PAIRS, _cfg()).max_length
    cfg = _cfg(max_length=short)  # LONG_PAIR does not fit: dropped and counted, not truncated
    start_c, start_r = _turn_logps(engine, noisy_adapter, DPO_PAIRS)
    base_c, _ = _turn_logps(engine, None, DPO_PAIRS)
    assert (start_c - base_c).abs().max() > 0.05  # so "reference = base" would show below
    adapters_before, ledger_before = _adapters(engine), engine.ledger.snapshot()
    name = _name("dpo")
    try:
        result = train_dpo(
            engine, pairs, cfg, tmp_path / "dpo", init_adapter=noisy_adapter, adapter_name=name
        )
        assert result.truncated == 1 and result.rows == 2 and result.dropped[0].startswith("pair 2 ")
        assert result.steps == 2 and result.max_length == short
        first = result.log_history[0]
        # The reference is the start adapter: at the first step policy == reference, so both rewards are 0.
        assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
        end_c, end_r = _turn_logps(engine, name, DPO_PAIRS)
        assert ((end_c - end_r) - (start_c - start_r) > 0).all()  # chosen-minus-rejected margin went up
        assert _adapters(engine) == sorted([*adapters_before, name]) and engine.active_adapter is None
        assert "forward" not in engine.base.__dict__
        spent = engine.ledger.snapshot() - ledger_before
        pairs_tokens = sum(
            _independent_tokens(
                engine, p.prompt, [[{"role": "assistant", "content": c}] for c in (p.chosen, p.rejected)]
            )
            for p in DPO_PAIRS
        )
        assert result.trained_tokens == spent.trained_tokens == 2 * pairs_tokens  # 2 epochs, both sequences
        assert result.reference_tokens == 2 * pairs_tokens  # the reference forward, charged as scoring
    finally:
        _drop_adapter(engine, name)


def test_a_fresh_lora_does_not_depend_on_the_global_rng(engine, tmp_path):
    """The adapter a DPO run trains from scratch depends on ``train.seed`` and the data only: what the
    process drew from torch's global generator before (which a resumed pipeline does not repeat) does
    not change it, and the global generator is left as it was."""
    from safetensors.torch import load_file

    from dits.train.dpo import train_dpo

    def train(seed: int, global_seed: int, tag: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(global_seed)
        name = _name(tag)
        before = torch.get_rng_state()
        try:
            train_dpo(engine, DPO_PAIRS, _cfg(max_steps=1).model_copy(update={"seed": seed}), tmp_path / tag,
                      adapter_name=name)  # fmt: skip
        finally:
            _drop_adapter(engine, name)
        assert torch.equal(torch.get_rng_state(), before)
        return load_file(str(tmp_path / tag / "adapter_model.safetensors"))

    a, b, other = train(0, 1, "a"), train(0, 2, "b"), train(1, 1, "c")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if "lora_A" in k)


def test_dpo_loss_equals_trl_loss(engine, noisy_adapter, tmp_path):
    from dits.train.dpo import dpo_trainer
    from dits.train.staging import REF_ADAPTER, TRAIN_ADAPTER
    from dits.train.step import dpo_loss, reference_logps

    cfg = _cfg()
    engine.model.save_pretrained(tmp_path, selected_adapters=[noisy_adapter])
    saved = str(tmp_path / noisy_adapter)  # start from the adapter on disk this time
    with dpo_trainer(engine, DPO_PAIRS, cfg, init_adapter=saved) as trainer:
        assert engine.active_adapter == TRAIN_ADAPTER
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # move the policy away from the reference so the loss is not log 2
            for n, p in engine.adapter_parameters(TRAIN_ADAPTER).items():
                if "lora_B" in n:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(DPO_PAIRS))])
        with torch.no_grad():
            trl_loss = float(trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)))
        engine.set_adapter(REF_ADAPTER)
        ref = reference_logps(engine, DPO_PAIRS)
        engine.set_adapter(TRAIN_ADAPTER)
        ours = dpo_loss(engine, DPO_PAIRS, cfg.dpo.beta, ref)
        assert ours.requires_grad
    ours = float(ours.detach())
    assert abs(ours - trl_loss) < 1e-5, (ours, trl_loss)
    assert abs(trl_loss - 0.6931471805599453) > 1e-3
    assert REF_ADAPTER not in _adapters(engine) and TRAIN_ADAPTER not in _adapters(engine)


def test_shared_prompt_keeps_the_gradient_of_separate_rows(engine, noisy_adapter):
    """A pair's chosen and rejected turns scored together share their prompt's KV (computed once, inside
    the graph): the gradient of their log-prob difference equals the one of each row scored alone."""
    from dits.train.rows import assistant_turn_text
    from dits.train.step import sequence_logps

    params = engine.adapter_parameters(noisy_adapter)
    pair = DPO_PAIRS[0]
    texts = [assistant_turn_text(engine.tokenizer, pair.prompt, t) for t in (pair.chosen, pair.rejected)]

    def grad(together: bool) -> tuple[dict[str, torch.Tensor], int]:
        before = engine.ledger.snapshot()
        with torch.enable_grad():
            if together:
                c, r = sequence_logps(engine, [pair])
            else:  # one row per call: nothing to share
                c, r = (
                    engine.score_tensors([pair.prompt], [t], keep_graph=True)[0].tensor.sum() for t in texts
                )
            got = torch.autograd.grad((c - r).sum(), list(params.values()))
        return dict(zip(params, got, strict=True)), (engine.ledger.snapshot() - before).cached_tokens

    flags = {n: p.requires_grad for n, p in params.items()}
    active = engine.active_adapter
    engine.set_adapter(noisy_adapter)
    try:
        for p in params.values():
            p.requires_grad_(True)
        shared, cached = grad(True)
        alone, cached_alone = grad(False)
    finally:
        engine.set_adapter(active)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    assert cached == _shared_prompt_tokens(engine, pair.prompt) and cached_alone == 0
    assert any(float(g.abs().max()) > 0 for g in shared.values())
    # Float32 sums in another order (one batch of two rows against two batches of one; the CPU's kernels
    # pick their blocking by shape) differ by ~1e-5 of a tensor's norm, so elements near zero are compared
    # against the tensor's norm, not their own magnitude. A prompt whose KV left the graph loses the
    # prompt's whole contribution: an error of the order of the gradient itself.
    for name in shared:
        err = float((shared[name] - alone[name]).norm())
        assert err <= 1e-3 * float(alone[name].norm()) + 1e-12, name  # measured: at most 3e-5 of the norm


# --------------------------------------------------------------------------------------------- one step


def test_one_step_then_restore_is_exact_and_lr0_changes_nothing(engine, noisy_adapter):
    from dits.train.step import one_step

    params = engine.adapter_parameters(noisy_adapter)
    saved = {n: p.detach().clone() for n, p in params.items()}
    others = {n: p.detach().clone() for n, p in engine.model.named_parameters() if n not in params}
    active = engine.active_adapter
    start_c, start_r = _turn_logps(engine, noisy_adapter, DPO_PAIRS[:1])

    def grad_flags() -> dict[str, bool]:
        return {n: p.requires_grad for n, p in engine.model.named_parameters()}

    flags = grad_flags()
    ledger_before = engine.ledger.snapshot()
    handle = one_step(engine, noisy_adapter, DPO_PAIRS[:1], lr=1e-2, beta=0.1)
    assert engine.active_adapter == active and grad_flags() == flags
    assert all(p.grad is None for p in engine.model.parameters())
    assert handle.update_norm > 0 and handle.grad_norm > 0
    assert abs(handle.loss - 0.6931471805599453) < 1e-5  # reference = the adapter before the step
    assert any(not torch.equal(p, saved[n]) for n, p in params.items())
    moved_c, moved_r = _turn_logps(engine, noisy_adapter, DPO_PAIRS[:1])
    assert float((moved_c - moved_r) - (start_c - start_r)) > 0  # one step in the DPO direction
    spent = engine.ledger.snapshot() - ledger_before
    p = DPO_PAIRS[0]
    seq_tokens = _independent_tokens(
        engine, p.prompt, [[{"role": "assistant", "content": c}] for c in (p.chosen, p.rejected)]
    )
    # The chosen and rejected rows share their prompt's forward; no reference forward (the reference is θ).
    shared = _shared_prompt_tokens(engine, p.prompt)
    assert spent.trained_tokens == handle.trained_tokens == seq_tokens - shared
    handle.restore()
    assert all(torch.equal(p, saved[n]) for n, p in params.items())

    flags = grad_flags()
    with one_step(engine, noisy_adapter, DPO_PAIRS, lr=0.0, beta=0.1, optimizer="adamw"):
        assert all(torch.equal(p, saved[n]) for n, p in params.items())
    with one_step(engine, noisy_adapter, DPO_PAIRS[:1], lr=0.0, beta=0.1, optimizer="sgd") as h:
        assert h.update_norm == 0.0
    assert all(torch.equal(p, saved[n]) for n, p in params.items())
    assert all(torch.equal(p, others[n]) for n, p in engine.model.named_parameters() if n in others)
    assert grad_flags() == flags and engine.active_adapter == active


# --------------------------------------------------------------------------------------------- full FT


@pytest.mark.slow
def test_full_finetune_dpo_trains_the_base_against_precomputed_reference(tmp_path):
    from dits.engine.hf import HFEngine
    from dits.train import TrainConfig
    from dits.train.dpo import train_dpo

    own = HFEngine("smollm2-135m")  # full fine-tuning changes the base: not the shared engine
    cfg = TrainConfig.model_validate(
        {"full_finetune": True, "dpo": {"lr": 1e-5, "batch_size": 2, "max_steps": 1}}
    )
    before = own.base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    result = train_dpo(own, DPO_PAIRS, cfg, tmp_path / "full")
    assert result.full_finetune and result.adapter_name is None and result.steps == 1
    assert abs(result.log_history[0]["rewards/chosen"]) < 1e-6  # reference = the model before the step
    assert not torch.equal(before, own.base.model.layers[0].self_attn.q_proj.weight)
    assert (tmp_path / "full" / "model.safetensors").is_file() and own.model is own.base
    assert "forward" not in own.base.__dict__ and not own.base.training
    assert result.trained_tokens == result.reference_tokens == own.ledger.counts.trained_tokens
    with pytest.raises(ValueError, match="init_adapter"):
        train_dpo(own, DPO_PAIRS, cfg, tmp_path / "again", init_adapter="sft")
