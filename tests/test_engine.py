"""The hf engine against independent computations: plain transformers forwards, batch-1 runs, PEFT."""

from __future__ import annotations

import torch

from dits.engine.base import SamplingParams
from dits.ledger import Ledger

VIEWS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [
        {"role": "system", "content": "You are Alice. Answer inside <A></A> tags and be brief about it."},
        {
            "role": "user",
            "content": "Where does Zorvath live? Note: Zorvath lives in Melbrook, a small town.",
        },
    ],
    [{"role": "user", "content": "Name a colour."}],
]


def test_shared_prefix_reuse_is_exact(engine):
    """Rows sharing a long prefix (same system prompt) reuse its KV; results equal batch-1 runs."""
    system = {"role": "system", "content": "You are Alice. Answer inside <A></A> tags. " * 4}
    views = [
        [system, {"role": "user", "content": q}] for q in ("Where is Melbrook?", "What is 7+8? Be brief.")
    ]
    before = engine.ledger.snapshot()
    batched = [c[0].token_ids for c in engine.generate(views, SamplingParams(max_new_tokens=12))]
    spent = engine.ledger.snapshot() - before
    shared = len(engine.encode_view([system]))  # at least the system turn is common
    assert spent.cached_tokens >= shared - 8
    assert batched == [engine.generate([v], SamplingParams(max_new_tokens=12))[0][0].token_ids for v in views]
    before = engine.ledger.snapshot()
    scored = engine.score(views, ["Melbrook is a town.", "<A>15</A>"])
    assert (engine.ledger.snapshot() - before).cached_tokens >= shared - 8
    for v, comp, sc in zip(views, ["Melbrook is a town.", "<A>15</A>"], scored, strict=True):
        alone = engine.score([v], [comp])[0]  # batch of one: no prefix reuse
        assert sc.token_ids == alone.token_ids
        assert torch.allclose(torch.tensor(sc.logprobs), torch.tensor(alone.logprobs), atol=1e-4)


def test_batched_greedy_equals_batch_of_one(engine):
    sp = SamplingParams(max_new_tokens=20)
    batched = [c[0].token_ids for c in engine.generate(VIEWS, sp)]
    single = [engine.generate([v], sp)[0][0].token_ids for v in VIEWS]
    assert len({len(engine.encode_view(v)) for v in VIEWS}) == 3  # really different lengths: padding is used
    assert batched == single


def test_greedy_matches_plain_transformers_generate(engine):
    ids = torch.tensor([engine.encode_view(VIEWS[1])])
    with torch.inference_mode():
        ref = engine.base.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False
        )
    ours = engine.generate([VIEWS[1]], SamplingParams(max_new_tokens=12))[0][0]
    assert ours.token_ids == [t for t in ref[0, ids.shape[1] :].tolist() if t not in engine.eos_ids]


def test_score_equals_manual_forward(engine):
    completions = ["The answer is <A>5</A>.", "Melbrook", "Blue is nice"]
    scored = engine.score(VIEWS, completions)
    for view, comp, sc in zip(VIEWS, completions, scored, strict=True):
        p = engine.encode_view(view)
        c = engine.tokenizer(comp, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = engine.base(torch.tensor([p + c])).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        manual = [lp[len(p) - 1 + k, t].item() for k, t in enumerate(c)]
        assert sc.token_ids == c
        assert torch.allclose(torch.tensor(sc.logprobs), torch.tensor(manual), atol=1e-4)


def test_sampling_is_seeded_per_row_and_independent_of_batch(engine):
    sp = SamplingParams(n=2, temperature=0.9, max_new_tokens=12, seed=3)
    a = engine.generate(VIEWS, sp, seeds=[11, 12, 13])
    b = engine.generate([VIEWS[1]], sp, seeds=[12])
    c = engine.generate(VIEWS, SamplingParams(n=2, temperature=0.9, max_new_tokens=12), seeds=[11, 99, 13])
    assert [x.token_ids for x in a[1]] == [x.token_ids for x in b[0]]
    assert [x.token_ids for x in a[1]] != [x.token_ids for x in c[1]]
    assert a[1][0].token_ids != a[1][1].token_ids  # the n samples differ from each other


def test_tiny_top_p_is_greedy(engine):
    greedy = engine.generate(VIEWS, SamplingParams(max_new_tokens=10))
    nucleus = engine.generate(VIEWS, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=10, seed=5))
    assert [g[0].token_ids for g in greedy] == [s[0].token_ids for s in nucleus]


def test_sampler_draws_each_row_by_its_own_uniform_from_the_tempered_softmax():
    """The token chosen for a row is the first whose cumulative tempered probability (vocabulary order for
    top_p 1, descending probability within the nucleus otherwise) exceeds the row's uniform draw; checked
    against that rule computed by hand on a 6-token vocabulary."""
    from dits.engine.hf import HFEngine

    logits = torch.tensor([[2.0, 0.5, -1.0, 1.5, 0.0, 3.0]] * 40)
    for top_p in (1.0, 0.8):
        sp = SamplingParams(temperature=0.7, top_p=top_p)
        chosen = HFEngine._choose(logits, [torch.Generator().manual_seed(s) for s in range(40)], sp)
        p = [float(x) for x in torch.softmax(logits[0].double() / 0.7, -1)]
        order = list(range(6)) if top_p == 1.0 else sorted(range(6), key=lambda i: -p[i])
        kept, mass = [], 0.0
        for i in order:
            if mass < top_p:
                kept.append(i)
            mass += p[i]
        total = sum(p[i] for i in kept)
        for s in range(40):
            u = float(torch.rand((), generator=torch.Generator().manual_seed(s), dtype=torch.float64)) * total
            acc, want = 0.0, kept[-1]
            for i in kept:
                acc += p[i]
                if acc > u:
                    want = i
                    break
            assert int(chosen[s]) == want, (top_p, s)
        assert len({int(t) for t in chosen}) > 1  # the draws are not all one token


def test_stop_strings_cut_the_text(engine):
    full = engine.generate([VIEWS[0]], SamplingParams(max_new_tokens=20))[0][0]
    word = full.text.split()[2]
    cut = engine.generate([VIEWS[0]], SamplingParams(max_new_tokens=20, stop=(word,)))[0][0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(word)]


def test_ledger_counts_equal_tokens_processed(engine):
    engine.ledger = Ledger(params=engine.params)
    sp = SamplingParams(n=2, temperature=0.7, max_new_tokens=9)
    out = engine.generate(VIEWS, sp)
    completions = ["yes", "no way", "<A>5</A>"]
    engine.score(VIEWS, completions)
    c = engine.ledger.counts
    prompt_gen = sum(len(engine.encode_view(v)) for v in VIEWS) * 2
    prompt_score = sum(len(engine.encode_view(v)) for v in VIEWS)
    assert c.prompt_tokens == prompt_gen + prompt_score
    assert c.generated_tokens == sum(x.generated_tokens for o in out for x in o)
    assert all(x.generated_tokens in (x.completion_tokens, x.completion_tokens + 1) for o in out for x in o)
    assert c.scored_tokens == sum(engine.count_tokens(t) for t in completions)
    assert engine.ledger.flops() == 2 * engine.params * (
        c.prompt_tokens + c.generated_tokens + c.scored_tokens
    )


def test_zero_adapter_is_identity_and_nonzero_changes(engine, tmp_path):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    peft_model = get_peft_model(engine.base, cfg, adapter_name="tmp")
    peft_model.save_pretrained(tmp_path / "zero", selected_adapters=["tmp"])
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(tmp_path / "big", selected_adapters=["tmp"])
    base_model = peft_model.unload()  # remove the LoRA layers again; the engine's base stays clean
    assert base_model is engine.base

    sp = SamplingParams(max_new_tokens=16)
    engine.set_adapter(None)
    base_out = [c[0].token_ids for c in engine.generate(VIEWS, sp)]
    base_score = engine.score(VIEWS[:1], ["The answer is 5"])[0].logprobs
    engine.load_adapter("zero", str(tmp_path / "zero" / "tmp"))
    engine.load_adapter("big", str(tmp_path / "big" / "tmp"))
    engine.set_adapter("zero")
    assert [c[0].token_ids for c in engine.generate(VIEWS, sp)] == base_out
    assert engine.score(VIEWS[:1], ["The answer is 5"])[0].logprobs == base_score
    engine.set_adapter("big")
    assert engine.score(VIEWS[:1], ["The answer is 5"])[0].logprobs != base_score
    engine.set_adapter(None)
    assert [c[0].token_ids for c in engine.generate(VIEWS, sp)] == base_out
    engine.delete_adapter("big")
    engine.delete_adapter("zero")
    assert engine.model is engine.base
    assert engine.score(VIEWS[:1], ["The answer is 5"])[0].logprobs == base_score


def test_growing_cache_holds_what_dynamic_cache_holds():
    """The in-place KV buffer returns exactly the keys/values transformers' concatenating cache does,
    through prefill, decode steps past its capacity, row selection and repetition."""
    from transformers import DynamicCache

    from dits.engine.hf import _GrowingCache

    gen = torch.Generator().manual_seed(0)
    ours, ref = _GrowingCache(), DynamicCache()

    def step(n: int, rows: int) -> None:
        k, v = torch.randn(rows, 3, n, 4, generator=gen), torch.randn(rows, 3, n, 4, generator=gen)
        got, want = ours.update(k, v, 0), ref.update(k, v, 0)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

    step(5, 1)
    ours.batch_repeat_interleave(4)
    ref.batch_repeat_interleave(4)
    for _ in range(40):  # beyond the first buffer's capacity (5 + the default reserve of 16)
        step(1, 4)
    sel = torch.tensor([0, 2])
    ours.batch_select_indices(sel)
    ref.batch_select_indices(sel)
    step(3, 2)
    step(1, 2)
    assert ours.get_seq_length() == ref.get_seq_length() == 5 + 40 + 4


def test_shared_prefix_attention_equals_attention_over_the_concatenated_kv():
    """One prefix KV for every row + each row's left-padded suffix gives what plain softmax attention over
    [prefix; suffix] gives (GQA with 3 query heads per KV head, a padded row, prefill and a decode step)."""
    from types import SimpleNamespace

    from dits.engine.shared_prefix import SharedPrefix, _attention, suffix_mask

    gen = torch.Generator().manual_seed(0)
    rows, hkv, g, d, p, s = 3, 2, 3, 8, 5, 4
    kp, vp = torch.randn(hkv, p, d, generator=gen), torch.randn(hkv, p, d, generator=gen)
    ks, vs = torch.randn(rows, hkv, s, d, generator=gen), torch.randn(rows, hkv, s, d, generator=gen)
    attn = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    module = SimpleNamespace(layer_idx=0)
    for q_len in (s, 1):  # prefill of the whole suffix; one decode query at the last position
        q = torch.randn(rows, hkv * g, q_len, d, generator=gen)
        got, _ = _attention(module, q, ks, vs, suffix_mask(attn, q_len), scaling=0.3,  # type: ignore[arg-type]
                            shared_prefix=SharedPrefix([(kp, vp)]))  # fmt: skip
        for b in range(rows):
            for h in range(hkv * g):
                keys = torch.cat([kp[h // g], ks[b, h // g]])
                values = torch.cat([vp[h // g], vs[b, h // g]])
                for i in range(q_len):
                    qpos = s - q_len + i
                    visible = [True] * p + [bool(attn[b, j]) and j <= qpos for j in range(s)]
                    w = torch.softmax((keys @ q[b, h, i] * 0.3).masked_fill(~torch.tensor(visible), -1e9), 0)
                    assert torch.allclose(got[b, i, h], w @ values, atol=1e-5)


def test_chain_turns_joins_a_turn_only_to_the_row_its_prompt_extends():
    from dits.engine.prompts import chain_turns

    pairs = [
        ([1, 2, 3], [4, 5]),  # row 1
        ([1, 2, 3, 4, 5, 6, 7], [8]),  # extends row 1: [1..5] is its start
        ([1, 2, 3, 4, 9, 6, 7, 8, 10], [11, 12]),  # 9 != 5: the template re-rendered a turn, new row
        ([1, 2, 3, 4, 9, 6, 7, 8, 10, 11, 12, 13], []),  # extends row 2, with an empty completion
    ]
    assert chain_turns(pairs) == [
        ([1, 2, 3, 4, 5, 6, 7, 8], [(3, 2), (7, 1)]),
        ([1, 2, 3, 4, 9, 6, 7, 8, 10, 11, 12, 13], [(9, 2), (12, 0)]),
    ]


def test_score_turns_equals_scoring_each_turn_on_its_view(engine):
    """Each speaker's turns of 5-turn conversations (with and without the forced prefix) scored in one
    forward per speaker: the same tokens and log-probs as each turn scored on its own view, for fewer tokens
    (the chain holds for this chat template, so every dialogue is one row)."""
    from dits.engine.prompts import chain_turns
    from dits.influence.likelihood import speaker_dialogues
    from dits.mas.dialogue import Transcript, Turn
    from dits.mas.protocol import ProtocolConfig
    from dits.tasks.builtin import make_builtin

    texts = [
        ["Where does Zorvath live?", "My notes say Melbrook.", "Then <A>Melbrook</A>.", "Agreed.", "Done."],
        ["What is the capital?", "I think it is Varn, a city.", "<A>Varn</A>", "Yes <A>Varn</A>", "ok"],
    ]
    examples = make_builtin("facts", "dev", 2, seed=3)
    transcripts = [
        Transcript(
            example_id=ex.id,
            turns=[Turn(speaker=k % 2, text=t, tokens=len(t.split())) for k, t in enumerate(tx)],
            stop_reason="agreed",
            answer=None,
            metric=0.0,
        )
        for ex, tx in zip(examples, texts, strict=True)
    ]
    for turn_prefix in (False, True):
        proto = ProtocolConfig(max_turns=5, worked_example=False, turn_prefix=turn_prefix)
        dialogues = [
            d for ex, tr in zip(examples, transcripts, strict=True) for d in speaker_dialogues(ex, tr, proto)
        ]
        assert sorted(len(d.turns) for d in dialogues) == [2, 2, 3, 3]
        for prefix in {d.prefix for d in dialogues}:
            group = [d.turns for d in dialogues if d.prefix == prefix]
            for turns in group:
                pairs = engine.prompts.pairs([v for v, _ in turns], [c for _, c in turns], prefix)
                assert len(chain_turns(pairs)) == 1
            before = engine.ledger.snapshot()
            with torch.inference_mode(), engine.adapter_scope():
                joined = engine.score_turns(group, prefix)
            mid = engine.ledger.snapshot()
            each = [engine.score([v for v, _ in turns], [c for _, c in turns], prefix) for turns in group]
            after = engine.ledger.snapshot()
            for a, b in zip(joined, each, strict=True):
                assert len(a) == len(b)
                for x, y in zip(a, b, strict=True):
                    assert x.token_ids == y.token_ids and x.token_ids
                    assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4)
            one, many = mid - before, after - mid
            assert one.scored_tokens == many.scored_tokens
            assert one.prompt_tokens < 0.7 * many.prompt_tokens
