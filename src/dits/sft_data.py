"""iSFT self-training data (DESIGN.md section 7b): best-of-n conversations per task, filtered, as SFT rows.

Per task, ``n`` conversations are sampled at temperature 0.7 (all tasks and samples in ONE batched dialogue
run, each with its own seed, so a sample does not depend on its batch) and rewarded with the Optima
reward. The best one of each task is kept if its reward reaches the threshold (0.5 information exchange,
0.6 debate), and of those the top fraction (0.7) by reward. Each kept conversation gives one row per
agent turn in TRL's conversational prompt-completion format: ``prompt`` is the renderer's view for that
speaker at that point, ``completion`` the turn as one assistant message (with the forced turn prefix, the
way the renderer writes an agent's own past turns), so training sees exactly the layout inference uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dits.engine.base import Engine
from dits.mas.dialogue import Transcript, run_dialogues
from dits.mas.protocol import ProtocolConfig, own_turn_content, render_view
from dits.reward import RewardBreakdown, RewardConfig, compute_reward, t_norm_from, utterance_nlls
from dits.search.pairs import keep_count
from dits.seeding import derive_seed
from dits.tasks.example import Example

__all__ = [
    "SAMPLES_FILE",
    "SFT_FILE",
    "SampledConversation",
    "SftData",
    "SftDataConfig",
    "SftRow",
    "build_sft_data",
    "default_threshold",
    "rows_to_dataset",
    "sample_conversations",
    "select_conversations",
    "sft_rows",
]

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SFT_FILE = "sft.jsonl"
SUMMARY_FILE = "sft_data.json"


class SftDataConfig(BaseModel):
    """iSFT selection knobs; defaults are the published ones."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_samples: int = Field(10, ge=1, description="conversations sampled per task")
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    threshold: float | None = Field(None, description="min reward of a task's best; None: 0.5 / 0.6 by mode")
    keep_fraction: float = Field(
        0.7, gt=0, le=1, description="of the qualifying best ones, keep this top share"
    )

    def threshold_for(self, example: Example) -> float:
        return self.threshold if self.threshold is not None else default_threshold(example)


def default_threshold(example: Example) -> float:
    """0.5 for information exchange, 0.6 for debate (Optima's iSFT)."""
    return 0.5 if example.mode == "exchange" else 0.6


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


class SftRow(BaseModel):
    """One SFT row (TRL conversational prompt-completion), with where it came from."""

    model_config = ConfigDict(extra="forbid")

    prompt: list[dict[str, str]]
    completion: list[dict[str, str]]
    example_id: str
    sample: int
    turn: int
    speaker: int
    reward: float


class SftData(BaseModel):
    """Everything one iSFT data pass produced."""

    t_norm: float
    samples: list[SampledConversation]
    kept: list[SampledConversation]
    """The selected conversations, in task order."""
    rows: list[SftRow]


def sample_conversations(
    engine: Engine,
    examples: Sequence[Example],
    protocol: ProtocolConfig,
    reward: RewardConfig,
    cfg: SftDataConfig | None = None,
    *,
    seed: int = 0,
    t_norm: float | None = None,
) -> tuple[list[SampledConversation], float]:
    """``cfg.n_samples`` conversations per task in one dialogue run, rewarded with one scoring call.

    Without ``t_norm`` the samples themselves are the calibration sample (they are drawn at the rollout
    temperature, as section 5 asks). Returns the samples (task-major) and the ``T_norm`` used.
    """
    cfg = cfg or SftDataConfig()
    flat = [(ex, j) for ex in examples for j in range(cfg.n_samples)]
    batch = [ex for ex, _ in flat]
    seeds = [derive_seed("dits.sft", seed, ex.id, j) for ex, j in flat]
    transcripts = run_dialogues(
        engine, batch, protocol, temperature=cfg.temperature, top_p=cfg.top_p, seeds=seeds
    )
    if t_norm is None:
        t_norm = t_norm_from([tr.comm_tokens for tr in transcripts], reward.t_norm_percentile)
    nlls = utterance_nlls(engine, batch, transcripts, protocol)
    samples = [
        SampledConversation(
            example_id=ex.id,
            sample=j,
            seed=s,
            transcript=tr,
            breakdown=compute_reward(ex, tr, nll, t_norm, reward),
        )
        for (ex, j), s, tr, nll in zip(flat, seeds, transcripts, nlls, strict=True)
    ]
    return samples, t_norm


def select_conversations(
    samples: Sequence[SampledConversation], examples: Sequence[Example], cfg: SftDataConfig | None = None
) -> list[SampledConversation]:
    """Best of n per task (ties: the lower sample index), kept if its reward reaches the task's threshold;
    then the top ``keep_fraction`` of those by reward (ties: task order), ``max(1, floor(n · fraction))``
    of ``n``, as the pair miner rounds. Returned in task order."""
    cfg = cfg or SftDataConfig()
    order = {ex.id: i for i, ex in enumerate(examples)}
    by_id = {ex.id: ex for ex in examples}
    best: dict[str, SampledConversation] = {}
    for s in samples:
        if s.example_id not in by_id:
            raise KeyError(f"sample for unknown example {s.example_id!r}")
        cur = best.get(s.example_id)
        if cur is None or (s.reward, -s.sample) > (cur.reward, -cur.sample):
            best[s.example_id] = s
    qualified = [s for eid, s in best.items() if s.reward >= cfg.threshold_for(by_id[eid])]
    qualified.sort(key=lambda s: (-s.reward, order[s.example_id]))
    kept = qualified[: keep_count(len(qualified), cfg.keep_fraction, "reference")]
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


def rows_to_dataset(rows: Sequence[SftRow]) -> Any:  # -> datasets.Dataset
    """The rows as a ``datasets.Dataset`` TRL's SFTTrainer reads (``prompt`` / ``completion`` messages)."""
    from datasets import Dataset, Features, Value

    message = {"role": Value("string"), "content": Value("string")}
    features = Features(
        {
            "prompt": [message],
            "completion": [message],
            "example_id": Value("string"),
            "sample": Value("int64"),
            "turn": Value("int64"),
            "speaker": Value("int64"),
            "reward": Value("float64"),
        }
    )
    columns: dict[str, list[Any]] = {k: [getattr(r, k) for r in rows] for k in features}
    return Dataset.from_dict(columns, features=features)


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
) -> SftData:
    """Sample, reward, select, and turn the kept conversations into SFT rows; with ``out_dir``, write
    ``samples.jsonl`` (every sample and its reward), ``sft.jsonl`` (the rows) and ``sft_data.json``."""
    from dits.jsonl import write_text_atomic as write_atomic

    cfg = cfg or SftDataConfig()
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate example ids")
    samples, used_t_norm = sample_conversations(
        engine, examples, protocol, reward, cfg, seed=seed, t_norm=t_norm
    )
    kept = select_conversations(samples, examples, cfg)
    by_id = {ex.id: ex for ex in examples}
    rows = [row for conv in kept for row in sft_rows(by_id[conv.example_id], conv, protocol)]
    data = SftData(t_norm=used_t_norm, samples=samples, kept=kept, rows=rows)
    log.info(
        "sft-data: %d tasks x %d samples, kept %d conversations, %d rows (T_norm %.1f)",
        len(examples),
        cfg.n_samples,
        len(kept),
        len(rows),
        used_t_norm,
    )
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / SAMPLES_FILE, "".join(s.model_dump_json() + "\n" for s in samples))
        write_atomic(out / SFT_FILE, "".join(r.model_dump_json() + "\n" for r in rows))
        summary = {
            "t_norm": used_t_norm,
            "tasks": len(examples),
            "samples": len(samples),
            "kept": [[c.example_id, c.sample] for c in kept],
            "rows": len(rows),
            "config": cfg.model_dump(mode="json"),
            "seed": seed,
        }
        write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2))
    return data
