"""Attention over one shared prefix and per-row suffixes, without copying the prefix into every row.

The search and the evaluation batch up to 64 rows whose prompts share a long prefix (system prompt, worked
examples). Computing that prefix's KV once saves its prefill, but transformers' caches hold one KV row per
sequence, so the prefix KV would be repeated into every row: 64 copies in memory, and 64 copies read at
every decode step, which on a CPU makes decoding bound by memory traffic rather than by the matmuls.

Here the prefix KV is kept once, ``(kv_heads, P, head_dim)`` per layer, and the cache holds only each row's
own suffix. The attention function below (registered with transformers' ``AttentionInterface`` and switched
on for the model only inside :func:`prefix_attention`) scores every row's queries against the one prefix in
a single matmul per KV head, scores them against the row's own suffix with the caller's mask, and takes one
softmax over both. transformers has no attention implementation for a KV prefix shared across the batch (its
paged cache shares blocks on GPU kernels only), hence this one function.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

__all__ = ["IMPLEMENTATION", "SharedPrefix", "prefix_attention", "suffix_mask"]

IMPLEMENTATION = "dits_shared_prefix"


@dataclass
class SharedPrefix:
    """The KV of one prefix, per layer ``(keys, values)`` each ``(kv_heads, P, head_dim)``."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1] if self.layers else 0

    @classmethod
    def from_cache(cls, cache: Any) -> SharedPrefix:
        """From a one-row transformers cache that holds exactly the prefix."""
        return cls([(layer.keys[0].contiguous(), layer.values[0].contiguous()) for layer in cache.layers])


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: SharedPrefix | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``softmax([q·Kp, q·Ks + mask]) · [Vp; Vs]`` with ``Kp, Vp`` the shared prefix (every row sees all of
    it) and ``Ks, Vs`` the row's own cached suffix; ``attention_mask`` is a 4D boolean mask over the suffix.
    Without a prefix it is transformers' sdpa."""
    if shared_prefix is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    if attention_mask is None or attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        raise ValueError("shared-prefix attention needs the 4D boolean suffix mask of suffix_mask()")
    kp, vp = shared_prefix.layers[module.layer_idx]  # type: ignore[index]
    b, h, q, d = query.shape
    hkv, p = kp.shape[0], kp.shape[1]
    g = h // hkv  # query heads per KV head (repeat_kv order: query head i reads KV head i // g)
    scale = scaling if scaling is not None else d**-0.5
    qg = query.reshape(b, hkv, g * q, d)
    # Prefix: all rows' queries against the one prefix, one (b·g·q × d) @ (d × P) matmul per KV head.
    # Scores, softmax and normaliser in float32 whatever the compute dtype, as eager attention upcasts its
    # softmax: in bf16 the exponentials and their sum over a long prefix lose most of their digits. The
    # products with V run in the compute dtype on the rounded weights (as eager's), the sum in float32.
    sp = torch.bmm(qg.transpose(0, 1).reshape(hkv, b * g * q, d), kp.transpose(1, 2)).float() * scale
    sp = sp.view(hkv, b, g * q, p).transpose(0, 1)  # (b, hkv, g·q, P), a view
    ss = torch.matmul(qg, key.transpose(2, 3)).float() * scale  # (b, hkv, g·q, S)
    mask = attention_mask[:, :, None].expand(b, 1, g, q, ss.shape[-1]).reshape(b, 1, g * q, ss.shape[-1])
    ss = ss.masked_fill(~mask, float("-inf"))
    top = torch.maximum(sp.amax(-1, keepdim=True), ss.amax(-1, keepdim=True))  # finite: P ≥ 1
    ep, es = (sp - top).exp(), (ss - top).exp()
    denom = ep.sum(-1, keepdim=True) + es.sum(-1, keepdim=True)
    ep, es = ep.to(vp.dtype), es.to(value.dtype)
    out_p = torch.bmm(ep.transpose(0, 1).reshape(hkv, b * g * q, p), vp)
    out = (out_p.view(hkv, b, g * q, d).transpose(0, 1).float() + torch.matmul(es, value).float()) / denom
    return out.to(query.dtype).reshape(b, h, q, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, _attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, sdpa_mask)


def suffix_mask(attn: torch.Tensor, q_len: int) -> torch.Tensor:
    """4D boolean mask ``(rows, 1, q_len, S)`` over the suffix positions: ``attn`` (rows × S, 1 = a real
    token) for the keys, causal for the last ``q_len`` positions (the queries)."""
    s = attn.shape[1]
    keys = attn.bool()[:, None, None, :]
    if q_len == 1:
        return keys
    causal = torch.ones(q_len, s, dtype=torch.bool, device=attn.device).tril(s - q_len)
    return keys & causal[None, None]


@contextmanager
def prefix_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention through the shared-prefix function (pass ``shared_prefix=`` and a
    :func:`suffix_mask` to its forward); its own implementation is restored afterwards."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = before
