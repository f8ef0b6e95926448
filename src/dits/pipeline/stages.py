"""The stage bodies of the loop: each reads the artifacts of earlier stages and writes its own.

Each method returns what later stages need (a :class:`ModelRef`, or a :class:`Product` naming a stage
directory and its digest); the inputs of a stage always include the digests of the stages it reads, so a
change upstream makes every later stage stale.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from dits.influence_cmd import SCORES_FILE
from dits.pipeline.loop import NEEDS_INFLUENCE, SHARED_UNTIL, STAGES, ModelRef
from dits.pipeline.stage import digest_of
from dits.seeding import derive_seed
from dits.select_cmd import SELECTED_FILE
from dits.tasks.example import Example

if TYPE_CHECKING:
    from dits.pipeline.loop import Pipeline


class Product(BaseModel):
    """A finished stage's directory and digest."""

    path: str
    digest: str


def _ids(examples: Sequence[Example]) -> list[str]:
    return [ex.id for ex in examples]


class Stages:
    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline
        self.cfg = pipeline.cfg

    @staticmethod
    def digest(inputs: Mapping[str, Any]) -> str:
        return digest_of(json.loads(json.dumps(dict(inputs), default=str)))

    def _run(
        self, stage: str, it: int | None, owner: str | None, inputs: dict[str, Any], body: Any
    ) -> tuple[Product, dict[str, float]]:
        m = self.p._stage(stage, it, owner, inputs, body)
        folder = "base" if it is None else f"iter_{it}"
        name = stage if owner is None else f"{stage}-{owner}"
        return Product(path=str(self.p.run_dir / folder / name), digest=m.digest), m.counts

    def _seed(self, stage: str, it: int) -> int:
        return derive_seed(self.cfg.seed, stage, it)

    # -- one iteration -----------------------------------------------------------------------------

    def iteration(
        self,
        it: int,
        method: str | None,
        model: ModelRef,
        tasks: Sequence[Example],
        test: Sequence[Example],
        shared: dict[str, Any],
    ) -> ModelRef:
        """Run iteration ``it`` of one method's lineage; return the model it ends with."""
        recipe = STAGES[self.cfg.pipeline.recipe]
        cut = recipe.index(SHARED_UNTIL) if SHARED_UNTIL in recipe else len(recipe)
        search: Product | None = None
        influence: Product | None = None
        selected: Product | None = None
        sft_data: Product | None = None
        for index, stage in enumerate(recipe):
            owner = None if (it == 0 and index < cut) or method is None else method
            if owner is None and stage in shared:
                result = shared[stage]
            elif stage == "sft-data":
                result = self.sft_data(it, owner, model, tasks)
            elif stage == "sft":
                assert sft_data is not None
                result = self.train(it, owner, model, sft_data, "sft")
            elif stage == "search":
                result = self.search(it, owner, model, tasks)
            elif stage == "influence":
                wanted = {method} if owner is not None else set(self.cfg.pipeline.methods)
                if not wanted & NEEDS_INFLUENCE:
                    result = None
                else:
                    assert search is not None
                    result = self.influence(it, owner, model, search)
            elif stage == "select":
                assert search is not None and method is not None
                result = self.select(it, method, search, influence)
            elif stage == "dpo":
                assert selected is not None
                result = self.train(it, owner, model, selected, "dpo")
            else:
                self.evaluate(it, owner, model, test)
                continue
            if owner is None:
                shared[stage] = result
            if stage in ("sft", "dpo"):
                model = result
            elif stage == "sft-data":
                sft_data = result
            elif stage == "search":
                search = result
            elif stage == "influence":
                influence = result
            elif stage == "select":
                selected = result
        return model

    # -- stages ------------------------------------------------------------------------------------

    def sft_data(self, it: int, owner: str | None, model: ModelRef, tasks: Sequence[Example]) -> Product:
        from dits.sft_data import build_sft_data

        cfg = self.cfg
        seed = self._seed("sft-data", it)
        inputs = {"model": model.digest, "tasks": _ids(tasks), "seed": seed,
                  **self.p._section("protocol", "reward", "sft_data")}  # fmt: skip

        def body(out: Path) -> dict[str, float]:
            engine = self.p.holder.activate(model)
            data = build_sft_data(engine, tasks, cfg.protocol, cfg.reward, out, cfg=cfg.sft_data, seed=seed)
            return {"tasks": len(tasks), "samples": len(data.samples), "kept": len(data.kept),
                    "rows": len(data.rows)}  # fmt: skip

        return self._run("sft-data", it, owner, inputs, body)[0]

    def train(self, it: int, owner: str | None, model: ModelRef, data: Product, kind: str) -> ModelRef:
        """SFT on an sft-data product or DPO on a select product; with no rows the model is unchanged."""
        cfg = self.cfg
        section = cfg.train.model_dump(mode="json")
        section.pop("dpo" if kind == "sft" else "sft")
        inputs = {"model": model.digest, "data": data.digest, "train": section}
        digest = self.digest(inputs)
        full = cfg.train.full_finetune
        result = ModelRef(kind="full" if full else "adapter", path=None, digest=digest)

        def body(out: Path) -> dict[str, float]:
            from dits.jsonl import read_jsonl

            engine = self.p.holder.activate(model)
            init = model.path if model.kind == "adapter" else None
            if kind == "sft":
                from dits.sft_data import SFT_FILE, SftRow
                from dits.train import train_sft

                rows = read_jsonl(Path(data.path) / SFT_FILE, SftRow)
                if not rows:
                    return {"rows": 0, "trained": 0}
                res = train_sft(engine, rows, cfg.train, out, adapter_name=result.adapter_name,
                                init_adapter=init)  # fmt: skip
            else:
                from dits.synthesize import read_pairs
                from dits.train import train_dpo

                pairs = read_pairs(Path(data.path) / SELECTED_FILE)
                if not pairs:
                    return {"rows": 0, "trained": 0}
                res = train_dpo(engine, pairs, cfg.train, out, init_adapter=init,
                                adapter_name=result.adapter_name, protocol=cfg.protocol)  # fmt: skip
            if full:
                self.p.holder.adopt_full(str(out))
            return {"rows": res.rows, "trained": 1, "truncated": res.truncated, "steps": res.steps,
                    "trained_tokens": res.trained_tokens, "loss": res.train_loss or 0.0}  # fmt: skip

        product, counts = self._run(kind, it, owner, inputs, body)
        if not counts.get("trained"):
            return model
        return result.model_copy(update={"path": product.path})

    def search(self, it: int, owner: str | None, model: ModelRef, tasks: Sequence[Example]) -> Product:
        from dits.synthesize import synthesize

        cfg = self.cfg.model_copy(update={"seed": self._seed("search", it)})
        inputs = {"model": model.digest, "tasks": _ids(tasks), "seed": cfg.seed,
                  **self.p._section("protocol", "reward", "search", "rollout", "pairs", "guide")}  # fmt: skip
        if cfg.guide.lam != 0:  # Î is estimated on the dev split with the influence settings
            inputs.update(self.p._section("influence", "task"))

        def body(out: Path) -> dict[str, float]:
            engine = self.p.holder.activate(model)
            s = synthesize(engine, tasks, cfg, out, pairs=cfg.pairs, progress=self.p.progress)
            return {"trees": s.trees, "rollouts": s.rollouts, "pairs": s.pairs}

        return self._run("search", it, owner, inputs, body)[0]

    def influence(self, it: int, owner: str | None, model: ModelRef, search: Product) -> Product:
        from dits.influence_cmd import score_pairs_file
        from dits.tasks.source import examples_for

        cfg = self.cfg
        val = examples_for(cfg.task, "dev")[: cfg.influence.val_tasks]
        inputs = {"model": model.digest, "pairs": search.digest, "val": _ids(val),
                  **self.p._section("protocol", "influence")}  # fmt: skip

        def body(out: Path) -> dict[str, float]:
            from dits.influence.inputs import probe_adapter
            from dits.synthesize import PAIRS_FILE

            engine = self.p.holder.activate(model)
            if model.kind == "adapter":
                adapter = model.adapter_name
            else:  # θ is the base (or a full fine-tune): probe with a fresh LoRA, which starts at θ exactly
                adapter = probe_adapter(engine, cfg.train.lora, seed=self._seed("probe", it))
            scores = score_pairs_file(
                engine, Path(search.path) / PAIRS_FILE, cfg, out, adapter=adapter, val_examples=val,
                progress=self.p.progress,
            )  # fmt: skip
            mean = sum(s.score for s in scores) / len(scores) if scores else 0.0
            return {"chunks": len(scores), "pairs": sum(len(s.pair_ids) for s in scores), "mean_score": mean}

        return self._run("influence", it, owner, inputs, body)[0]

    def select(self, it: int, method: str, search: Product, influence: Product | None) -> Product:
        from dits.select_cmd import select_to_dir
        from dits.synthesize import PAIRS_FILE

        sel = self.cfg.select.model_copy(update={"strategy": method})
        needs = method in NEEDS_INFLUENCE
        inputs = {"pairs": search.digest, "scores": influence.digest if needs and influence else None,
                  "select": sel.model_dump(mode="json")}  # fmt: skip

        def body(out: Path) -> dict[str, float]:
            scores = Path(influence.path) / SCORES_FILE if needs and influence else None
            s = select_to_dir(Path(search.path) / PAIRS_FILE, scores, sel, out)
            return {"pool": s.total, "kept": s.kept, "mean_q_kept": s.mean_q_kept}

        return self._run("select", it, method, inputs, body)[0]

    def evaluate(self, it: int | None, owner: str | None, model: ModelRef, test: Sequence[Example]) -> None:
        from dits.evaluate import evaluate

        cfg = self.cfg
        inputs = {"model": model.digest, "tasks": _ids(test), **self.p._section("protocol")}

        def body(out: Path) -> dict[str, float]:
            engine = self.p.holder.activate(model)
            s = evaluate(engine, test, "mas", cfg.protocol, out, progress=self.p.progress)
            return {"metric": s.metric.mean, "low": s.metric.low, "high": s.metric.high,
                    "comm_tokens": s.comm_tokens, "n": s.n}  # fmt: skip

        self._run("evaluate", it, owner, inputs, body)
