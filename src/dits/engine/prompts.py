"""Turning views into token ids: one encoder both backends use, so ``hf`` and ``vllm`` see the same prompt
tokens for the same view (chat template, generation header, forced prefix) and end turns on the same ids."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from dits.engine.base import View

__all__ = ["PromptEncoder", "Span", "chain_turns"]

Span = tuple[int, int]
"""(start, length) of a completion inside a row of token ids."""


class PromptEncoder:
    """Chat-template encoding with a bounded cache (a search re-encodes the same views many times)."""

    def __init__(self, tokenizer: Any, cache_size: int = 20000) -> None:
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_size = cache_size
        self._assistant_header: str | None = None
        tok = tokenizer
        self.pad_id: int = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.eos_ids: set[int] = {
            i for i in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if i is not None
        }
        """Token ids that end an assistant turn (never part of a completion)."""
        self.eos_ids.discard(tok.unk_token_id)

    def encode_view(self, view: View, prefix: str = "") -> list[int]:
        """Token ids of the chat-templated view with the generation header and forced ``prefix``."""
        key = json.dumps([view, prefix])
        ids = self._cache.get(key)
        if ids is None:
            text = self.tokenizer.apply_chat_template(list(view), add_generation_prompt=True, tokenize=False)
            ids = self.tokenizer(text + prefix, add_special_tokens=False)["input_ids"]
            self._cache[key] = ids
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return list(ids)

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def pairs(
        self, views: Sequence[View], completions: Sequence[str], prefix: str = ""
    ) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, completion ids) per view; a completion is tokenised on its own, no end-of-turn."""
        return [
            (self.encode_view(v, prefix), self.encode_text(c))
            for v, c in zip(views, completions, strict=True)
        ]

    def alone_pairs(self, texts: Sequence[str], prefix: str = "") -> list[tuple[list[int], list[int]]]:
        """(assistant header + ``prefix``, text ids) per text: each text as a lone assistant turn."""
        if self._assistant_header is None:
            self._assistant_header = self.assistant_header()
        head = self.encode_text(self._assistant_header + prefix)
        return [(list(head), self.encode_text(t)) for t in texts]

    def assistant_header(self) -> str:
        """What the chat template writes before an assistant turn's content (and the BOS token, if the
        template starts with it), found as the difference between a prompt with and without the
        generation header: template-agnostic, and without the system prompt a template may insert."""
        probe = [{"role": "user", "content": "x"}]
        full = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        bare = self.tokenizer.apply_chat_template(probe, add_generation_prompt=False, tokenize=False)
        if not full.startswith(bare):
            raise ValueError("the chat template renders a prompt differently with a generation header")
        header, bos = full[len(bare) :], self.tokenizer.bos_token or ""
        # A document-start token the template opens with (Llama 3's <|begin_of_text|>) goes first; one
        # that is the turn marker itself (ChatML's <|im_start|>) is already in the header.
        return (bos if bos and bare.startswith(bos) and not header.startswith(bos) else "") + header


def chain_turns(pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[Span]]]:
    """One speaker's successive turns of a dialogue, (prompt ids, completion ids) each, as few rows as
    possible: a turn joins the row before it when that row's ids (earlier prompt + completion) are the first
    tokens of the turn's prompt, i.e. the chat template renders the earlier turn inside the later view with
    the same tokens. A causal model then gives every turn of the row the same log-probs in one forward as
    in a forward of its own, and a speaker's T turns cost one pass over the conversation instead of T
    passes over growing views. Where the template or the tokenizer breaks the chain, a new row starts."""
    rows: list[tuple[list[int], list[Span]]] = []
    for prompt, completion in pairs:
        if rows and prompt[: len(rows[-1][0])] == rows[-1][0]:
            rows[-1] = (prompt + completion, [*rows[-1][1], (len(prompt), len(completion))])
        else:
            rows.append((prompt + completion, [(len(prompt), len(completion))]))
    return rows
