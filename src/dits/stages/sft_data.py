"""The ``sft-data`` stage (iSFT, docs/design.md section 7b): best-of-n conversations per task, filtered, as
SFT rows.

Per task, ``n`` conversations are sampled at temperature 0.7 (tasks and samples in large batched dialogue
runs, each with its own seed, so a sample does not depend on its batch) and rewarded with the Optima
reward (T_norm: the task's longest sample, as the reference's iSFT). As in the reference, the tasks' best
conversations are ranked by reward, the top 70% kept (MATH: ranks 10%–80%), and of those the ones below the
dataset's ε dropped (:mod:`dits.tasks.defaults`). Each kept conversation gives one row per
agent turn in TRL's conversational prompt-completion format: ``prompt`` is the renderer's view for that
speaker at that point, ``completion`` the turn as one assistant message (with the forced turn prefix, the
way the renderer writes an agent's own past turns), so training sees exactly the layout inference uses.

Each batch of conversations is appended to ``dialogues.jsonl`` as it comes back (:mod:`dits.stages.units`),
so a killed stage samples only the batches it had not stored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dits.artifacts import (
    DIALOGUES_FILE,
    SAMPLES_FILE,
    SFT_FILE,
    SFT_SUMMARY_FILE,
    write_jsonl_atomic,
    write_text_atomic,
)
from dits.config import SftDataConfig
from dits.engine.base import Engine
from dits.executor import Executor, Workbench
from dits.mas.dialogue import Transcript, run_dialogues
from dits.mas.protocol import ProtocolConfig, own_turn_content, render_view
from dits.records import SftRow
from dits.reward import RewardBreakdown, RewardConfig, compute_reward, t_norm_from, utterance_nlls
from dits.seeding import derive_seed
from dits.stages.context import ModelRef, Product, StageContext, example_ids
from dits.stages.units import Unit, UnitMap
from dits.tasks.example import Example

__all__ = [
    "SampledConversation",
    "SampledDialogue",
    "SftData",
    "build_sft_data",
    "sample_conversations",
    "select_conversations",
    "sft_data_stage",
    "sft_rows",
]

log = logging.getLogger(__name__)


class SampledConversation(BaseModel):
    """One sampled conversation and its reward."""

    model_config = ConfigDict(extra="forbid")

    example_id: str
    sample: int
    seed: int
    transcript: Transcript
    breakdown: RewardBreakdown

    @property
    def reward(self) -> float:
        return self.breakdown.total


class SampledDialogue(BaseModel):
    """One sampled conversation as the sampler returns it: with its utterances' NLLs under the initial model
    and before any reward (its ``T_norm`` needs every sample)."""

    model_config = ConfigDict(extra="forbid")

    example_id: str
    sample: int
    seed: int
    transcript: Transcript
    nlls: list[float]


class SftData(BaseModel):
    """Everything one iSFT data pass produced."""

    t_norm: float | None
    """The one T_norm of every reward (None: each task's longest sample, ``token_norm: task_max``)."""
    samples: list[SampledConversation]
    kept: list[SampledConversation]
    """The selected conversations, in task order."""
    rows: list[SftRow]


@dataclass(frozen=True)
class SampleDialogues:
    """iSFT sampling's work unit: one batch of ``(task, sample index, seed)`` conversations, and each
    utterance's NLL under the initial model (the readability term's input)."""

    protocol: ProtocolConfig
    temperature: float
    top_p: float

    def __call__(self, bench: Workbench, part: list[tuple[Example, int, int]]) -> list[SampledDialogue]:
        transcripts = run_dialogues(bench.engine(), [ex for ex, _, _ in part], self.protocol,
                                    temperature=self.temperature, top_p=self.top_p,
                                    seeds=[s for _, _, s in part])  # fmt: skip
        nlls = utterance_nlls(bench.initial(), transcripts, self.protocol)
        return [SampledDialogue(example_id=ex.id, sample=j, seed=s, transcript=tr, nlls=nll)
                for (ex, j, s), tr, nll in zip(part, transcripts, nlls, strict=True)]  # fmt: skip


def _key(example_id: str, sample: int) -> str:
    """A sampled conversation's name in ``dialogues.jsonl`` (task and sample index)."""
    return f"{example_id}#{sample}"


def sample_conversations(
    engine: Engine,
    examples: Sequence[Example],
    protocol: ProtocolConfig,
    reward: RewardConfig,
    cfg: SftDataConfig | None = None,
    *,
    seed: int = 0,
    t_norm: float | None = None,
    nll_engine: Engine | None = None,
    progress: bool = False,
    batch: int = 256,
    executor: Executor | None = None,
    model: ModelRef | None = None,
    store: Path | None = None,
) -> tuple[list[SampledConversation], float | None]:
    """``cfg.n_samples`` conversations per task in batched dialogue runs of ``batch`` conversations (a
    progress bar counts them; ``executor`` runs the batches with ``model`` active, default: here on
    ``engine``), each batch's utterances scored in one call per speaker. With ``store`` (a JSONL file) each
    batch's conversations are appended there as they come back, and a call after a kill samples only the
    batches not stored (:mod:`dits.stages.units`).

    ``T_norm``: ``t_norm`` if given; else with ``cfg.token_norm == "task_max"`` (the reference) each task's
    longest sample, else the ``reward.t_norm_percentile`` of all samples (drawn at the rollout temperature,
    as docs/design.md section 5 asks). ``nll_engine`` runs the initial model for the readability NLLs (default
    ``engine``). Returns the samples (task-major) and the one ``T_norm`` used (None: per task).
    """
    cfg = cfg or SftDataConfig()
    flat = [(ex, j, derive_seed("dits.sft", seed, ex.id, j)) for ex in examples for j in range(cfg.n_samples)]
    parts = [flat[i : i + batch] for i in range(0, len(flat), batch)]
    units = [Unit(part, tuple(_key(ex.id, j) for ex, j, _ in part)) for part in parts]
    dialogues = UnitMap(units, store, SampledDialogue, lambda d: _key(d.example_id, d.sample))
    work = SampleDialogues(protocol, cfg.temperature, cfg.top_p)
    for _ in dialogues.run(work, executor, model, engine=engine, initial=nll_engine, desc="sft-data",
                           unit="conv", progress=progress):  # fmt: skip
        pass
    sampled = dialogues.records()
    transcripts = [d.transcript for d in sampled]
    norms: list[float]
    if t_norm is not None:
        norms = [t_norm] * len(flat)
    elif cfg.token_norm == "percentile":
        t_norm = t_norm_from([tr.comm_tokens for tr in transcripts], reward.t_norm_percentile)
        norms = [t_norm] * len(flat)
    else:  # the reference's: each task's longest sample
        longest: dict[str, int] = {}
        for (ex, _, _), tr in zip(flat, transcripts, strict=True):
            longest[ex.id] = max(longest.get(ex.id, 1), tr.comm_tokens)
        norms = [float(longest[ex.id]) for ex, _, _ in flat]
    samples = [
        SampledConversation(
            example_id=ex.id,
            sample=d.sample,
            seed=d.seed,
            transcript=d.transcript,
            breakdown=compute_reward(ex, d.transcript, d.nlls, norm, reward),
        )
        for (ex, _, _), d, norm in zip(flat, sampled, norms, strict=True)
    ]
    return samples, t_norm


def select_conversations(
    samples: Sequence[SampledConversation], examples: Sequence[Example], cfg: SftDataConfig | None = None
) -> list[SampledConversation]:
    """The reference's iSFT selection (thunlp/Optima ``process_dataloader_for_sft``), per dataset: each
    task's best sample (ties: the lower sample index); those sorted by reward (ties: task order) and cut to
    the ranks ``[int(from·n), int(to·n))`` of the dataset's n tasks (top 70%; MATH 10%–80%); then the ones
    below the dataset's ε dropped. Returned in task order."""
    cfg = cfg or SftDataConfig()
    order = {ex.id: i for i, ex in enumerate(examples)}
    dataset_of = {ex.id: ex.dataset for ex in examples}
    best: dict[str, SampledConversation] = {}
    for s in samples:
        if s.example_id not in order:
            raise KeyError(f"sample for unknown example {s.example_id!r}")
        cur = best.get(s.example_id)
        if cur is None or (s.reward, -s.sample) > (cur.reward, -cur.sample):
            best[s.example_id] = s
    kept: list[SampledConversation] = []
    for dataset in dict.fromkeys(ex.dataset for ex in examples):
        ranked = sorted(
            (b for eid, b in best.items() if dataset_of[eid] == dataset),
            key=lambda s: (-s.reward, order[s.example_id]),
        )
        lo, hi = cfg.slice_for(dataset)
        n, eps = len(ranked), cfg.threshold_for(dataset)
        kept += [s for s in ranked[int(lo * n) : int(hi * n)] if s.reward >= eps]
    return sorted(kept, key=lambda s: order[s.example_id])


def sft_rows(example: Example, conversation: SampledConversation, protocol: ProtocolConfig) -> list[SftRow]:
    """One row per turn: the speaker's view before it as prompt, the turn as the completion."""
    texts = conversation.transcript.texts
    rows: list[SftRow] = []
    for k, turn in enumerate(conversation.transcript.turns):
        prompt = [
            {"role": m["role"], "content": m["content"]}
            for m in render_view(example, texts[:k], turn.speaker, protocol)
        ]
        content = own_turn_content(turn.text, turn.speaker, protocol)
        rows.append(
            SftRow(
                prompt=prompt,
                completion=[{"role": "assistant", "content": content}],
                example_id=example.id,
                sample=conversation.sample,
                turn=k,
                speaker=turn.speaker,
                reward=conversation.reward,
            )
        )
    return rows


def build_sft_data(
    engine: Engine,
    examples: Sequence[Example],
    protocol: ProtocolConfig,
    reward: RewardConfig,
    out_dir: str | Path | None = None,
    *,
    cfg: SftDataConfig | None = None,
    seed: int = 0,
    t_norm: float | None = None,
    nll_engine: Engine | None = None,
    progress: bool = False,
    batch: int = 256,
    executor: Executor | None = None,
    model: ModelRef | None = None,
) -> SftData:
    """Sample, reward, select, and turn the kept conversations into SFT rows; with ``out_dir``, write
    ``samples.jsonl`` (every sample and its reward), ``sft.jsonl`` (the rows) and ``sft_data.json``."""
    cfg = cfg or SftDataConfig()
    ids = example_ids(examples)
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate example ids")
    samples, used_t_norm = sample_conversations(
        engine,
        examples,
        protocol,
        reward,
        cfg,
        seed=seed,
        t_norm=t_norm,
        nll_engine=nll_engine,
        progress=progress,
        batch=batch,
        executor=executor,
        model=model,
        store=Path(out_dir) / DIALOGUES_FILE if out_dir is not None else None,
    )
    kept = select_conversations(samples, examples, cfg)
    by_id = {ex.id: ex for ex in examples}
    rows = [row for conv in kept for row in sft_rows(by_id[conv.example_id], conv, protocol)]
    data = SftData(t_norm=used_t_norm, samples=samples, kept=kept, rows=rows)
    log.info(
        "sft-data: %d tasks x %d samples, kept %d conversations, %d rows (T_norm %s)",
        len(examples),
        cfg.n_samples,
        len(kept),
        len(rows),
        "per task (longest sample)" if used_t_norm is None else f"{used_t_norm:.1f}",
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl_atomic(out / SAMPLES_FILE, samples)
        write_jsonl_atomic(out / SFT_FILE, rows)
        summary = {
            "t_norm": used_t_norm,
            "tasks": len(examples),
            "samples": len(samples),
            "kept": [[c.example_id, c.sample] for c in kept],
            "rows": len(rows),
            "config": cfg.model_dump(mode="json"),
            "seed": seed,
        }
        write_text_atomic(out / SFT_SUMMARY_FILE, json.dumps(summary, indent=2))
    return data


def sft_data_stage(
    ctx: StageContext, iteration: int, owner: str | None, model: ModelRef, tasks: Sequence[Example]
) -> Product:
    """The sft-data stage of ``iteration``: samples and SFT rows of ``tasks`` under ``model``."""
    cfg = ctx.cfg
    seed = ctx.seed("sft-data", iteration)
    inputs = {"model": model.digest, "tasks": example_ids(tasks), "seed": seed,
              **cfg.sections("protocol", "reward", "sft_data")}  # fmt: skip

    def body(out: Path) -> dict[str, float]:
        engine = ctx.activate(model)
        data = build_sft_data(engine, tasks, cfg.protocol, cfg.reward, out, cfg=cfg.sft_data, seed=seed,
                              progress=ctx.progress, executor=ctx.executor, model=model)  # fmt: skip
        return {"tasks": len(tasks), "samples": len(data.samples), "kept": len(data.kept),
                "rows": len(data.rows)}  # fmt: skip

    return ctx.run("sft-data", iteration, owner, inputs, body)[0]
