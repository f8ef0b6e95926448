"""The ``sft`` and ``dpo`` stages: train the lineage's model on an sft-data or a select stage's output.

LoRA continues from the lineage's adapter (or starts fresh on the base); with ``train.full_finetune`` the
base weights are trained and saved, and the run's engine is rebuilt on them when the lineage next needs
them. With no rows to train on the model is unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dits.artifacts import SELECTED_FILE, SFT_FILE, digest, read_jsonl
from dits.records import PreferencePair, SftRow
from dits.stages.context import ModelRef, Product, StageContext

__all__ = ["train_stage"]


def train_stage(
    ctx: StageContext,
    iteration: int,
    owner: str | None,
    model: ModelRef,
    data: Product,
    kind: Literal["sft", "dpo"],
) -> ModelRef:
    """SFT on an sft-data product or DPO on a select product; returns the model it ends with."""
    cfg = ctx.cfg
    section = cfg.train.model_dump(mode="json")
    section.pop("dpo" if kind == "sft" else "sft")
    inputs = {"model": model.digest, "data": data.digest, "train": section}
    full = cfg.train.full_finetune
    result = ModelRef(kind="full" if full else "adapter", path=None, digest=digest(inputs))

    def body(out: Path) -> dict[str, float]:
        from dits.train import train_dpo, train_sft

        engine = ctx.policy(model)
        init = model.path if model.kind == "adapter" else None
        if kind == "sft":
            rows = read_jsonl(data.file(SFT_FILE), SftRow)
            if not rows:
                return {"rows": 0, "trained": 0}
            res = train_sft(engine, rows, cfg.train, out, adapter_name=result.adapter_name, init_adapter=init)
        else:
            pairs = read_jsonl(data.file(SELECTED_FILE), PreferencePair)
            if not pairs:
                return {"rows": 0, "trained": 0}
            res = train_dpo(
                engine, pairs, cfg.train, out, init_adapter=init, adapter_name=result.adapter_name
            )
        if full:
            ctx.holder.adopt_full(str(out))
        return {"rows": res.rows, "trained": 1, "truncated": res.truncated, "steps": res.steps,
                "trained_tokens": res.trained_tokens, "loss": res.train_loss or 0.0}  # fmt: skip

    product, manifest = ctx.run(kind, iteration, owner, inputs, body)
    if not manifest.counts.get("trained"):
        return model
    return result.model_copy(update={"path": product.path})
