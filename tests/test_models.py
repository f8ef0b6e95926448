"""Model resolution: the GGUF cache reproduces the GGUF, and bad references say what is accepted."""

from __future__ import annotations

import pytest
import torch

from dits.models import (
    ModelReferenceError,
    embedded_gguf,
    load_gguf_direct,
    load_model_and_tokenizer,
    resolve_model,
)


@pytest.mark.parametrize("ref", ["no-such-model", "./missing.gguf", "a/b/c"])
def test_bad_reference_lists_accepted_forms(ref):
    with pytest.raises(ModelReferenceError) as e:
        resolve_model(ref)
    msg = str(e.value)
    assert ref.lstrip("./") in msg
    if not ref.endswith(".gguf"):
        assert "smollm2-135m" in msg and ".gguf" in msg and "config.json" in msg


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelReferenceError, match=r"config\.json"):
        resolve_model(str(tmp_path))


def test_hub_id_is_classified_as_hub():
    assert resolve_model("meta-llama/Meta-Llama-3-8B-Instruct").kind == "hub"


def test_gguf_and_cached_load_give_same_greedy_continuation():
    src = resolve_model("smollm2-135m")
    assert src.kind == "alias" and (src.gguf == embedded_gguf())
    cached, tok = load_model_and_tokenizer("smollm2-135m")
    direct, tok2 = load_gguf_direct(embedded_gguf())
    msgs = [{"role": "user", "content": "Where does Zorvath live? Zorvath lives in Melbrook."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids2 = tok2.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert torch.equal(ids["input_ids"], ids2["input_ids"])
    with torch.inference_mode():
        a = cached.generate(**ids, max_new_tokens=16, do_sample=False)
        b = direct.generate(**ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(a, b)
    for (n1, p1), (n2, p2) in zip(cached.state_dict().items(), direct.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
