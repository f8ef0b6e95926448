"""The ``hf`` engine: batched generation and scoring with transformers on CPU or GPU.

Why a hand-written decode loop instead of ``model.generate``: a tree search needs (1) per-row seeded
sampling, so a conversation's tokens do not depend on which other conversations share its batch (resume
and shard-independence rely on it), (2) rows leaving the batch as soon as they finish (their KV cache rows
are dropped, so a batch of mixed-length utterances does not pay for its longest member), and (3) stop
strings checked per row. The model forward, the KV cache and the adapters are transformers' and PEFT's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from dits.engine.base import Completion, Engine, SamplingParams, ScoredCompletion, View
from dits.engine.precision import autocast, resolve_device, resolve_dtype, weights_dtype
from dits.engine.prompts import PromptEncoder, Span, chain_turns
from dits.engine.shared_prefix import SharedPrefix, prefix_attention, suffix_mask
from dits.ledger import Ledger
from dits.models import load_model_and_tokenizer
from dits.seeding import derive_seed

log = logging.getLogger(__name__)

_GROUP_KEY_TOKENS = 48


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``targets``, in float32 whatever the logits' dtype, one row
    at a time: a batch's float32 log-softmax over a 49k vocabulary is GBs (8k positions: 1.6 GB, plus the
    float32 copy of bf16 logits), one row's is tens of MB. (TRL's ``selective_log_softmax`` loops the same
    way; it keeps bf16 logits in bf16.)"""
    rows = []
    for lg, tg in zip(logits, targets, strict=True):
        lg = lg.float() / temperature
        rows.append(lg.gather(-1, tg.unsqueeze(-1)).squeeze(-1) - lg.logsumexp(-1))
    return torch.stack(rows)


class _GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live in a buffer with room to spare, so a decode step writes
    its token in place. transformers' ``DynamicLayer`` appends with ``torch.cat``, copying the whole cache at
    every step of every layer: on a CPU that copy cost more than the step's matmuls (measured: half of a
    64-row decode step's time). A buffer is made with room for ``reserve`` more tokens (the caller's
    ``max_new_tokens``: a prefill then never re-buffers while decoding) and doubles if that runs out, so the
    copies are amortised O(1) per token without holding twice the prompt's KV."""

    _buf: tuple[torch.Tensor, torch.Tensor] | None = None

    def __init__(self, reserve: int = 16) -> None:
        super().__init__()
        self.reserve = reserve

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cur = self.keys.shape[-2] if self.keys.numel() else 0
        n = key_states.shape[-2]
        if self._buf is None or cur + n > self._buf[0].shape[-2]:
            b, h, _, d = key_states.shape
            cap = cur + n + (self.reserve if self._buf is None else cur + n)
            kb = key_states.new_empty((b, h, cap, d))
            vb = value_states.new_empty((b, h, cap, value_states.shape[-1]))
            if cur:
                kb[:, :, :cur] = self.keys
                vb[:, :, :cur] = self.values
            self._buf = (kb, vb)
        kb, vb = self._buf
        kb[:, :, cur : cur + n] = key_states
        vb[:, :, cur : cur + n] = value_states
        self.keys, self.values = kb[:, :, : cur + n], vb[:, :, : cur + n]
        return self.keys, self.values

    # Row selection and repetition make new tensors from the views; the next update re-buffers them.
    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._buf = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._buf = None


class _GrowingCache(DynamicCache):
    """A ``DynamicCache`` of :class:`_GrowingLayer` layers, each with room for ``reserve`` tokens."""

    def __init__(self, reserve: int = 16) -> None:
        Cache.__init__(self, layer_class_to_replicate=lambda: _GrowingLayer(reserve))  # type: ignore[arg-type]


@dataclass
class _Row:
    """One sequence to decode: a prompt, its own RNG seed, and what it has produced so far."""

    view_index: int
    sample_index: int
    prompt_ids: list[int]
    seed: int
    out_ids: list[int] = field(default_factory=list)
    finish: str = "length"
    steps: int = 0
    text: str = ""


class HFEngine(Engine):
    """One base model, optional PEFT LoRA adapters, batched generate/score, charging ``ledger``; a
    :class:`~dits.engine.policy.TrainablePolicy` (training and the influence probes run on this model).

    ``token_budget`` bounds a micro-batch by rows × (longest prompt + new tokens), which bounds the KV cache;
    ``max_batch`` bounds rows. Rows are sorted by prompt length first (length bucketing) so padding is small.

    ``dtype`` is the compute dtype (``auto``: :func:`~dits.engine.precision.resolve_dtype`). With
    ``trainable_base`` (full fine-tuning) and a half-precision compute dtype the weights are held in float32
    and every forward runs under autocast, so training updates them in full precision
    (:mod:`dits.engine.precision`).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        device: str | None = None,
        dtype: str = "auto",
        trainable_base: bool = False,
        token_budget: int = 32768,
        max_batch: int = 64,
        score_token_budget: int = 8192,
        ledger: Ledger | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        """The compute dtype."""
        self.weights_dtype = weights_dtype(self.dtype, trainable_base)
        """The dtype the base weights are stored in (float32 master weights under full fine-tuning)."""
        self.base, self.tokenizer = load_model_and_tokenizer(
            model,
            dtype=getattr(torch, self.weights_dtype),
            device=self.device,
            trust_remote_code=trust_remote_code,
        )
        self.model_ref = model
        self.model: torch.nn.Module = self.base
        self.token_budget = token_budget
        self.max_batch = max_batch
        self.score_token_budget = score_token_budget
        self.params = sum(p.numel() for p in self.base.parameters())
        self.ledger = ledger or Ledger(params=self.params)
        self.prompts = PromptEncoder(self.tokenizer)
        self.pad_id = self.prompts.pad_id
        self.eos_ids = set(self.prompts.eos_ids)
        self._active: str | None = None
        # transformers renamed past_key_values -> cache (5.2x); accept both so older 5.x still works.
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(self.base.forward).parameters else "past_key_values"
        )

    def autocast(self) -> AbstractContextManager[object]:
        """The precision a forward runs in: autocast to the compute dtype when the weights are wider."""
        return autocast(self.device, self.dtype, self.weights_dtype)

    def hold_master_weights(self) -> None:
        master = weights_dtype(self.dtype, trainable_base=True)
        if self.weights_dtype == master:
            return
        log.warning(
            "full fine-tuning an engine that holds %s weights: upcasting them to float32 master weights "
            "(build it with trainable_base=True to load them in float32)",
            self.weights_dtype,
        )
        self.base.to(getattr(torch, master))
        self.weights_dtype = master

    # ------------------------------------------------------------------ prompts

    def encode_view(self, view: View, prefix: str = "") -> list[int]:
        """Token ids of the chat-templated view with the generation header and forced ``prefix``."""
        return self.prompts.encode_view(view, prefix)

    def count_tokens(self, text: str) -> int:
        return len(self.prompts.encode_text(text))

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            self.model.load_adapter(path, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name)
        self.model.eval()

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name``; removing the last one unwraps PEFT so the bare base runs again
        (a PeftModel left with no adapter fails on every forward)."""
        if name not in self.adapter_names():
            raise KeyError(f"unknown adapter {name!r}")
        if self._active == name:
            self._active = None
        if len(self.adapter_names()) == 1:
            self.model = self.model.unload()  # strips the LoRA layers out of self.base in place
            return
        keep = next(n for n in self.adapter_names() if n != name)
        if self.model.active_adapter == name:  # PEFT warns when its active adapter is deleted
            self.model.set_adapter(keep)
        self.model.delete_adapter(name)

    def add_adapter(self, name: str, config: Any, *, seed: int | None = None) -> None:
        """Create a fresh (trainable) adapter from a ``peft.LoraConfig``, e.g. for training or a probe.

        PEFT draws the initial A from torch's global generator, whose state depends on everything the
        process ran before; with ``seed`` it is drawn from a generator seeded with it instead (and the
        global one is left as it was), so the adapter depends on the seed alone."""
        from peft import PeftModel, get_peft_model

        with torch.random.fork_rng(enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, config)
            else:
                self.model = get_peft_model(self.base, config, adapter_name=name)

    def set_adapter(self, name: str | None) -> None:
        if name is not None:
            if name not in self.adapter_names():
                raise KeyError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names()}")
            self.model.set_adapter(name)
        self._active = name

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def adapter_names(self) -> list[str]:
        from peft import PeftModel

        return list(self.model.peft_config) if isinstance(self.model, PeftModel) else []

    def adapter_config(self, name: str) -> Any:
        if name not in self.adapter_names():
            raise KeyError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names()}")
        return self.model.peft_config[name]

    def adapter_parameters(self, name: str) -> dict[str, torch.nn.Parameter]:
        """The trainable tensors of one adapter (LoRA A/B, and any modules-to-save copies), by parameter
        name. Found through PEFT's own per-layer registries rather than by matching names, so an adapter
        called e.g. ``"model"`` cannot capture the base weights."""
        if name not in self.adapter_names():
            raise KeyError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names()}")
        wanted: set[int] = set()
        for module in self.model.modules():
            for layer_name in getattr(module, "adapter_layer_names", ()):
                holder: Any = module
                for part in layer_name.split("."):
                    holder = getattr(holder, part, None)
                if isinstance(holder, torch.nn.ModuleDict) and name in holder:
                    wanted.update(id(p) for p in holder[name].parameters())
                elif isinstance(holder, torch.nn.ParameterDict) and name in holder:
                    wanted.add(id(holder[name]))
        params = {n: p for n, p in self.model.named_parameters() if id(p) in wanted}
        if not params:
            raise ValueError(f"adapter {name!r} has no trainable tensors")
        return params

    def adapter_scope(self) -> AbstractContextManager[object]:
        if self.adapter_names() and self._active is None:
            return self.model.disable_adapter()
        return nullcontext()

    @contextmanager
    def booked_as_training(self) -> Iterator[None]:
        real, scratch = self.ledger, Ledger(params=self.ledger.params)
        self.ledger = scratch
        try:
            yield
        finally:
            self.ledger = real
            c = scratch.counts
            assert c is not None
            real.charge(trained_tokens=c.prompt_tokens - c.cached_tokens + c.scored_tokens)

    # ------------------------------------------------------------------ generate

    def generate(
        self, views: Sequence[View], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        """``sampling.n`` completions per view. Row seeds come from ``seeds[i]`` (per view) when given, so a
        caller can make each conversation's randomness independent of the batch it lands in."""
        if seeds is not None and len(seeds) != len(views):
            raise ValueError(f"got {len(seeds)} seeds for {len(views)} views")
        n_draw = 1 if sampling.greedy else sampling.n
        rows: list[_Row] = []
        for i, view in enumerate(views):
            ids = self.encode_view(view, sampling.prefix)
            base = seeds[i] if seeds is not None else derive_seed(sampling.seed, i)
            for k in range(n_draw):
                rows.append(_Row(i, k, ids, derive_seed(base, k)))
        # Rows with the same leading tokens (same system prompt) go together so they share a prefix KV;
        # within a group, ascending length keeps padding small.
        order = sorted(rows, key=lambda r: (r.prompt_ids[:_GROUP_KEY_TOKENS], len(r.prompt_ids)))
        with torch.inference_mode(), self.adapter_scope():
            for batch in self._micro_batches(order, sampling.max_new_tokens, self.token_budget):
                self._decode(batch, sampling)
        out: list[list[Completion]] = [[] for _ in views]
        for r in rows:
            c = Completion(r.text, r.out_ids, len(r.prompt_ids), len(r.out_ids), r.finish, r.steps)  # type: ignore[arg-type]
            out[r.view_index].append(c)
        if sampling.greedy and sampling.n > 1:
            out = [[c] * sampling.n for (c,) in out]
        return out

    def _micro_batches(self, rows: list[_Row], extra: int, budget: int) -> Iterator[list[_Row]]:
        batch: list[_Row] = []
        for r in rows:  # ascending length: the newest row is the longest
            if batch and (
                (len(batch) + 1) * (len(r.prompt_ids) + extra) > budget or len(batch) >= self.max_batch
            ):
                yield batch
                batch = []
            batch.append(r)
        if batch:
            yield batch

    def _decode(self, batch: list[_Row], sampling: SamplingParams) -> None:
        dev = self.device
        # Prefix reuse: rows that start with the same tokens (system prompt, worked example, task) have that
        # prefix's KV computed and stored once (:mod:`dits.engine.shared_prefix`); the cache holds each row's
        # own left-padded suffix, whose positions continue after the prefix.
        shared = self._shared_prefix([r.prompt_ids for r in batch])
        prefix = self._prefix_kv(batch[0].prompt_ids[:shared])
        ids, attn = self._left_pad([r.prompt_ids[shared:] for r in batch], self.pad_id)
        ids, attn = ids.to(dev), attn.to(dev)
        pos = shared + (attn.cumsum(-1) - 1).clamp(min=0)
        cache = _GrowingCache(reserve=sampling.max_new_tokens)
        gens = [torch.Generator().manual_seed(r.seed) for r in batch]
        alive = list(range(len(batch)))
        logits = self._forward(ids, attn, pos, cache, prefix, logits_to_keep=1)[:, -1, :]
        next_pos = pos[:, -1]
        self.ledger.charge(
            prompt_tokens=sum(len(r.prompt_ids) for r in batch), cached_tokens=shared * (len(batch) - 1)
        )
        generated = 0
        for _step in range(sampling.max_new_tokens):
            toks = self._choose(logits, [gens[j] for j in alive], sampling)
            generated += len(alive)
            keep: list[int] = []
            for slot, j in enumerate(alive):
                r, t = batch[j], int(toks[slot])
                r.steps += 1
                if t in self.eos_ids:
                    r.finish = "stop"
                    continue
                r.out_ids.append(t)
                if sampling.stop and self._hit_stop(r, sampling.stop):
                    r.finish = "stop"
                    continue
                if len(r.out_ids) < sampling.max_new_tokens:
                    keep.append(slot)
            if not keep:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                attn, next_pos, toks = attn[sel], next_pos[sel], toks[sel]
                alive = [alive[s] for s in keep]
            attn = torch.cat([attn, attn.new_ones((len(alive), 1))], dim=1)
            next_pos = next_pos + 1
            logits = self._forward(toks[:, None].to(dev), attn, next_pos[:, None], cache, prefix)[:, -1, :]
        self.ledger.charge(generated_tokens=generated)
        for r in batch:
            text = self.tokenizer.decode(r.out_ids, skip_special_tokens=True)
            if sampling.stop:
                cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, r.finish = text[:cut], "stop"
            r.text = text

    @staticmethod
    def _shared_prefix(prompts: Sequence[Sequence[int]], minimum: int = 16) -> int:
        """Length of the token prefix all prompts share (at least one token is left to each prompt)."""
        if len(prompts) < 2:
            return 0
        first = prompts[0]
        n = min(len(p) for p in prompts) - 1
        for ids in prompts[1:]:
            k = 0
            while k < n and ids[k] == first[k]:
                k += 1
            n = k
        return n if n >= minimum else 0

    def _prefix_kv(self, prefix_ids: Sequence[int]) -> SharedPrefix | None:
        """KV of a prefix common to a batch's rows, computed once (None for no prefix)."""
        if not prefix_ids:
            return None
        cache = DynamicCache()
        ids = torch.tensor([list(prefix_ids)], device=self.device)
        with self.autocast():
            self.model(input_ids=ids, logits_to_keep=1, **{self._cache_kw: cache})
        return SharedPrefix.from_cache(cache)

    def _forward(
        self,
        ids: torch.Tensor,
        attn: torch.Tensor,
        pos: torch.Tensor,
        cache: DynamicCache | None,
        prefix: SharedPrefix | None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits of a forward over left-padded ``ids`` (``attn`` covers the cached suffix and ``ids``),
        after ``prefix`` when given."""
        kw: dict[str, Any] = {"position_ids": pos, "logits_to_keep": logits_to_keep}
        if cache is not None:
            kw[self._cache_kw] = cache
        with self.autocast():
            if prefix is None:
                return self.model(input_ids=ids, attention_mask=attn, **kw).logits
            with prefix_attention(self.base):
                mask = suffix_mask(attn, ids.shape[1])
                return self.model(input_ids=ids, attention_mask=mask, shared_prefix=prefix, **kw).logits

    @staticmethod
    def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences left-padded to the longest, with their attention mask."""
        width = max(len(x) for x in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, x in enumerate(seqs):
            ids[j, width - len(x) :] = torch.tensor(list(x))
            attn[j, width - len(x) :] = 1
        return ids, attn

    def _hit_stop(self, r: _Row, stops: tuple[str, ...]) -> bool:
        tail = self.tokenizer.decode(r.out_ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    @staticmethod
    def _choose(logits: torch.Tensor, gens: list[torch.Generator], sampling: SamplingParams) -> torch.Tensor:
        """Greedy argmax, or temperature + nucleus sampling with one uniform draw per row from its own RNG."""
        logits = logits.float()
        if sampling.greedy:
            return logits.argmax(-1).cpu()
        probs = torch.softmax(logits / sampling.temperature, dim=-1).cpu()
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in gens]).float()
        if sampling.top_p >= 1.0:
            # Inverse CDF over the vocabulary in id order: no sort. Sorting 64 rows of a 49k vocabulary
            # took 2x the lm_head's time per decode step on a 2-core CPU, for a nucleus that keeps everything.
            cdf = probs.cumsum(-1)
            return (
                torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1))
                .clamp(max=cdf.shape[-1] - 1)
                .squeeze(-1)
            )
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= sampling.top_p, 0.0)
        cdf = sorted_p.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=cdf.shape[-1] - 1)
        return idx.gather(-1, pick).squeeze(-1)

    # ------------------------------------------------------------------ score

    def score(
        self, views: Sequence[View], completions: Sequence[str], prefix: str = "", *, temperature: float = 1.0
    ) -> list[ScoredCompletion]:
        """Per-token log-probs of each completion's tokens (tokenised on its own, no end-of-turn token)."""
        if len(views) != len(completions):
            raise ValueError(f"got {len(completions)} completions for {len(views)} views")
        with torch.inference_mode(), self.adapter_scope():
            return self.score_tensors(views, completions, prefix, temperature=temperature)

    def score_tensors(
        self,
        views: Sequence[View],
        completions: Sequence[str],
        prefix: str = "",
        *,
        keep_graph: bool = False,
        temperature: float = 1.0,
    ) -> list[ScoredCompletion]:
        """Scoring core; with ``keep_graph`` each result also carries a differentiable ``tensor`` of
        log-probs (used by the gradient influence estimator). Grad mode and adapters are the caller's."""
        pairs = self.prompts.pairs(views, completions, prefix)
        return self._score_token_pairs(pairs, keep_graph, temperature)

    def score_alone(self, texts: Sequence[str], prefix: str = "") -> list[ScoredCompletion]:
        with torch.inference_mode(), self.adapter_scope():
            return self._score_token_pairs(self.prompts.alone_pairs(texts, prefix), keep_graph=False)

    def score_turns(
        self,
        dialogues: Sequence[Sequence[tuple[View, str]]],
        prefix: str = "",
        *,
        keep_graph: bool = False,
        temperature: float = 1.0,
    ) -> list[list[ScoredCompletion]]:
        """Per-token log-probs of each turn of each dialogue: one speaker's successive (view, completion)
        turns, each view holding the earlier ones. The same numbers as :meth:`score_tensors` on every turn,
        computed in one forward per dialogue where the template allows
        (:func:`~dits.engine.prompts.chain_turns`). Grad mode and adapters are the caller's."""
        rows: list[tuple[list[int], list[Span]]] = []
        for turns in dialogues:
            pairs = self.prompts.pairs([v for v, _ in turns], [c for _, c in turns], prefix)
            rows += chain_turns(pairs)
        flat = [sc for row in self._score_rows(rows, keep_graph, temperature) for sc in row]
        out: list[list[ScoredCompletion]] = []
        k = 0
        for turns in dialogues:
            out.append(flat[k : k + len(turns)])
            k += len(turns)
        return out

    def _score_token_pairs(
        self, pairs: list[tuple[list[int], list[int]]], keep_graph: bool, temperature: float = 1.0
    ) -> list[ScoredCompletion]:
        rows = [(p + c, [(len(p), len(c))]) for p, c in pairs]
        return [row[0] for row in self._score_rows(rows, keep_graph, temperature)]

    def _score_rows(
        self, rows: list[tuple[list[int], list[Span]]], keep_graph: bool, temperature: float = 1.0
    ) -> list[list[ScoredCompletion]]:
        """Rows of token ids with the spans to score, in micro-batches bounded by ``score_token_budget``
        (row width × rows) and by half of it in logits positions (scored tail × rows)."""

        def tail(i: int) -> int:  # positions from the row's first scored token to its end
            ids, spans = rows[i]
            return len(ids) - min(s for s, _ in spans)

        order = sorted(range(len(rows)), key=lambda i: (rows[i][0][:_GROUP_KEY_TOKENS], len(rows[i][0])))
        out: list[list[ScoredCompletion] | None] = [None] * len(rows)
        batch: list[int] = []

        def flush() -> None:
            scored = self._score_batch([rows[i] for i in batch], keep_graph, temperature)
            for i, sc in zip(batch, scored, strict=True):
                out[i] = sc
            batch.clear()

        width = keep = 0
        for i in order:
            wider, longer = max(width, len(rows[i][0])), max(keep, tail(i) + 1)
            n = len(batch) + 1
            too_big = n * wider > self.score_token_budget or n * longer > self.score_token_budget // 2
            if batch and (too_big or len(batch) >= self.max_batch):
                flush()
                wider, longer = len(rows[i][0]), tail(i) + 1
            batch.append(i)
            width, keep = wider, longer
        if batch:
            flush()
        return [o for o in out if o is not None]

    def _score_batch(
        self, rows: list[tuple[list[int], list[Span]]], keep_graph: bool, temperature: float = 1.0
    ) -> list[list[ScoredCompletion]]:
        """Left-padded so every row ends at the last position: only the logits from the earliest scored
        token on are materialised (vocab-sized logits for whole prompts would dominate memory)."""
        tails = [len(ids) - min(s for s, _ in spans) for ids, spans in rows]
        max_t = max(tails)
        if max_t == 0:
            return [[ScoredCompletion([], []) for _ in spans] for _, spans in rows]
        # Shared-prefix reuse as in generation, also when a graph is kept: the prefix's KV is then part of
        # the graph and every row's gradient flows back into it (a DPO pair's chosen and rejected turns share
        # their whole prompt, most of the pair's tokens, so its forward and backward cost about half).
        shared = self._shared_prefix([ids[: len(ids) - t] for (ids, _), t in zip(rows, tails, strict=True)])
        prefix = self._prefix_kv(rows[0][0][:shared])
        ids, attn = self._left_pad([r[shared:] for r, _ in rows], self.pad_id)
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = shared + (attn.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, attn, pos, None, prefix, logits_to_keep=max_t + 1)
        targets = ids[:, ids.shape[1] - max_t :]
        tok_lp = _token_logprobs(logits[:, :-1, :], targets, temperature)  # the last max_t tokens
        n_scored = sum(n for _, spans in rows for _, n in spans)
        self.ledger.charge(
            prompt_tokens=sum(len(r) for r, _ in rows) - n_scored,
            cached_tokens=shared * (len(rows) - 1),
            scored_tokens=n_scored,
        )
        results: list[list[ScoredCompletion]] = []
        for j, (row, spans) in enumerate(rows):
            scored: list[ScoredCompletion] = []
            for start, n in spans:
                at = max_t - (len(row) - start)  # the span's first token among the last max_t
                lp = tok_lp[j, at : at + n]
                toks = row[start : start + n]
                scored.append(ScoredCompletion(toks, lp.detach().cpu().tolist(), lp if keep_graph else None))
            results.append(scored)
        return results
