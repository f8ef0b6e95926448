"""grow_pool(): resuming after a crash gives the same trees as an uninterrupted run; files and pairs.

The kill-and-resume test runs the real command path (``add_parser`` → handler → engine from config) in
subprocesses and SIGKILLs one mid-run. It uses a tiny randomly initialised model with the embedded
model's tokenizer: what is tested is the bookkeeping (which trees exist, once each, with identical
content), which does not depend on the model being any good, and a tiny model keeps it CI-fast.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dits.artifacts import StageChanged, read_jsonl
from dits.config import RunConfig, load_config, parse_config, parse_overrides
from dits.mas.protocol import ProtocolConfig, render_view
from dits.records import PreferencePair
from dits.search.pairs import PairConfig, default_tau, mine_tree_pairs
from dits.search.tree import Tree
from dits.stages.context import ModelRef, StageContext
from dits.stages.search import grow_pool, search_stage
from dits.tasks.builtin import make_builtin
from dits.tasks.source import examples_for
from dits.train.rows import preference_rows
from tests.helpers import LOW, SeededEngine, many_examples, search_config, tree_lines

REPO = Path(__file__).resolve().parents[1]


# -- files -------------------------------------------------------------------------------------------


def _small_tree(task_id: str) -> Tree:
    t = Tree.new(task_id)
    t.record_rollout("n0", ["hello", "there"], 0.5)
    return t


def test_read_trees_cuts_a_torn_last_line_and_refuses_a_corrupt_middle(tmp_path):
    path = tmp_path / "trees.jsonl"
    good = "".join(_small_tree(f"t{i}").to_json() + "\n" for i in range(2))
    torn = _small_tree("t2").to_json()
    path.write_text(good + torn[: len(torn) // 2])
    with pytest.raises(ValueError, match="jsonl:3: torn last line"):  # read as a finished artifact
        read_jsonl(path, Tree)
    assert [t.task_id for t in read_jsonl(path, Tree, repair=True)] == ["t0", "t1"]  # read to resume
    assert path.read_text() == good  # truncated on disk, ready for appends

    path.write_text(good + torn)  # a whole tree whose newline never made it: kept, newline restored
    assert [t.task_id for t in read_jsonl(path, Tree, repair=True)] == ["t0", "t1", "t2"]
    assert path.read_text() == good + torn + "\n"

    path.write_text(good.replace('"t0"', '"t0', 1))
    with pytest.raises(ValueError, match="jsonl:1"):
        read_jsonl(path, Tree)


def test_default_tau_by_dataset():
    names = ("facts", "hotpotqa", "triviaqa", "gsm8k", "math", "arc", "mmlu", "arith")
    assert [default_tau(d) for d in names] == [0.4, 0.4, 0.43, 0.45, 0.45, 0.45, 0.45, 0.45]
    assert PairConfig(tau=0.1).tau_for("math") == 0.1


# -- in-process runs with a scripted engine ----------------------------------------------------------


class Crash(Exception):
    pass


class CrashingEngine(SeededEngine):
    def __init__(self, crash_after: int) -> None:
        super().__init__()
        self.crash_after = crash_after

    def generate(self, views, sampling, seeds=None):  # type: ignore[no-untyped-def]
        if len(self.calls) >= self.crash_after:
            raise Crash
        return super().generate(views, sampling, seeds)


def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path):
    examples = many_examples(6)
    cfg = search_config()
    ref_engine = SeededEngine()
    ref = grow_pool(ref_engine, examples, cfg, tmp_path / "ref", shard_size=2, progress=False, pairs=LOW)
    assert ref.trees_new == 6 and ref.pairs > 0

    crashing = CrashingEngine(crash_after=len(ref_engine.calls) // 2)  # dies in the middle shard
    with pytest.raises(Crash):
        grow_pool(crashing, examples, cfg, tmp_path / "run", shard_size=2, progress=False, pairs=LOW)
    partial = tree_lines(tmp_path / "run" / "trees.jsonl")
    assert 0 < len(partial) < 6

    engine = SeededEngine()
    resumed = grow_pool(engine, examples, cfg, tmp_path / "run", shard_size=2, progress=False, pairs=LOW)
    assert resumed.trees_new == 6 - len(partial)
    lines = tree_lines(tmp_path / "run" / "trees.jsonl")
    assert lines[: len(partial)] == partial
    ids = [t["task_id"] for t in lines]
    assert len(ids) == len(set(ids)) == 6
    ref_lines = tree_lines(tmp_path / "ref" / "trees.jsonl")
    key = lambda t: t["task_id"]  # noqa: E731
    assert sorted(lines, key=key) == sorted(ref_lines, key=key)
    assert (tmp_path / "run" / "pairs.jsonl").read_text() == (tmp_path / "ref" / "pairs.jsonl").read_text()
    assert resumed.rollouts == ref.rollouts == 6 * 3 * 2

    # A finished directory: nothing is regrown, nothing is generated.
    again = SeededEngine()
    done = grow_pool(again, examples, cfg, tmp_path / "run", shard_size=2, progress=False, pairs=LOW)
    assert done.trees_new == 0 and again.calls == []


def test_a_shard_cut_short_is_regrown_whole_and_only_its_missing_trees_written(tmp_path):
    import shutil

    examples = many_examples(6)
    cfg = search_config()
    grow_pool(SeededEngine(), examples, cfg, tmp_path / "ref", shard_size=2, progress=False, pairs=LOW)
    shutil.copytree(tmp_path / "ref", tmp_path / "run")
    trees_file = tmp_path / "run" / "trees.jsonl"
    lines = trees_file.read_text().splitlines(keepends=True)
    trees_file.write_text("".join(lines[:3]))  # shard 1 and half of shard 2 made it to disk

    engine = SeededEngine()
    resumed = grow_pool(engine, examples, cfg, tmp_path / "run", shard_size=2, progress=False, pairs=LOW)
    assert resumed.trees_new == 3
    views, _, _ = engine.calls[0]
    assert len(views) == 2 * cfg.search.expand  # shard 2 ran with both of its trees, as originally
    assert trees_file.read_text() == "".join(lines)


def test_t_norm_is_calibrated_once_and_persisted(tmp_path):
    examples = many_examples(4)
    cfg = search_config(explore=1)
    first = grow_pool(SeededEngine(), examples[:2], cfg, tmp_path, shard_size=2, progress=False)
    stored = json.loads((tmp_path / "t_norm.json").read_text())
    assert stored["t_norm"] == first.t_norm and stored["example_ids"] == [ex.id for ex in examples[:2]]
    # A later call (more tasks) keeps the stored value instead of recalibrating on a different sample.
    engine = SeededEngine()
    second = grow_pool(engine, examples, cfg, tmp_path, shard_size=2, progress=False)
    assert second.t_norm == first.t_norm
    assert json.loads((tmp_path / "t_norm.json").read_text()) == stored
    with pytest.raises(ValueError, match="T_norm"):
        grow_pool(SeededEngine(), examples, cfg, tmp_path, progress=False, t_norm=first.t_norm + 1)


def test_a_different_config_is_refused(tmp_path):
    """The search stage (what ``dits synthesize`` and the pipeline run) refuses to mix trees of two
    configs in one directory, naming the key."""
    examples = many_examples(2)

    def run(cfg: RunConfig) -> None:
        ctx = StageContext.single(cfg, tmp_path, engine=SeededEngine(), progress=False)
        search_stage(ctx, 0, None, ModelRef.base(cfg), examples)

    run(search_config(explore=1))
    assert (tmp_path / "manifest.json").exists() and read_jsonl(tmp_path / "trees.jsonl", Tree)
    with pytest.raises(StageChanged, match=r"search\.explore: 1 -> 2"):
        run(search_config(explore=2))


def test_pairs_with_a_turn_prefix_render_like_the_protocol(tmp_path):
    proto = ProtocolConfig(max_turns=5, max_new_tokens=12, turn_prefix=True)
    cfg = search_config().model_copy(update={"protocol": proto})
    examples = many_examples(2)
    grow_pool(SeededEngine(), examples, cfg, tmp_path, progress=False, pairs=LOW)
    pairs = read_jsonl(tmp_path / "pairs.jsonl", PreferencePair)
    trees = {t.task_id: t for t in read_jsonl(tmp_path / "trees.jsonl", Tree)}
    by_id = {ex.id: ex for ex in examples}
    assert pairs
    assert pairs == [p for ex in examples for p in mine_tree_pairs(trees[ex.id], ex, proto, LOW)]
    ds = preference_rows(pairs)
    for p, row in zip(pairs, ds, strict=True):
        assert isinstance(p, PreferencePair)
        assert row["prompt"] == render_view(by_id[p.tree_task_id], p.prefix, p.speaker, proto)
        name = ("Alice", "Bob")[p.speaker]
        # Same layout as the renderer's own past turns: "<Name>: " + utterance.
        later = render_view(by_id[p.tree_task_id], [*p.prefix, p.chosen, "x"], p.speaker, proto)
        assert row["chosen"] == [{"role": "assistant", "content": f"{name}: {p.chosen}"}] == [later[-2]]
        assert row["rejected"][0]["content"] == f"{name}: {p.rejected}"


# -- task source and command-line helpers ------------------------------------------------------------


def test_examples_for_dispatches_builtin_and_files(monkeypatch):
    cfg = parse_config({"task": {"dataset": "facts", "seed": 3, "train": 5, "knobs": {"hops": 2}}})
    got = examples_for(cfg.task, "train")
    assert got == make_builtin("facts", "train", 5, 3, hops=2)
    assert examples_for(cfg.task, "train", limit=2) == got[:2]
    assert examples_for(cfg.task, "validation", limit=1) == make_builtin("facts", "dev", 1, 3, hops=2)

    seen = {}

    def fake_load(dataset, split, path=None, *, seed=0, limit=None, up_to=False):  # type: ignore[no-untyped-def]
        seen.update(dataset=dataset, split=split, path=path, seed=seed, limit=limit, up_to=up_to)
        return []

    monkeypatch.setattr("dits.tasks.source.load_examples", fake_load)
    gsm = parse_config({"task": {"dataset": "gsm8k", "path": "/data/gsm8k", "seed": 7, "test": 9}})
    examples_for(gsm.task, "test")
    assert seen == {"dataset": "gsm8k", "split": "test", "path": "/data/gsm8k", "seed": 7, "limit": 9,
                    "up_to": False}  # fmt: skip
    with pytest.raises(ValueError, match="knobs"):
        examples_for(gsm.task.model_copy(update={"knobs": {"hops": 2}}), "test")


def test_overrides_parse_yaml_values():
    ov = parse_overrides(["search.explore=2", "task.knobs={hops: 2}", "protocol.turn_prefix=true"])
    assert ov == {"search.explore": 2, "task.knobs": {"hops": 2}, "protocol.turn_prefix": True}
    cfg = load_config(None, ov)
    assert cfg.search.explore == 2 and cfg.task.knobs == {"hops": 2} and cfg.protocol.turn_prefix
    with pytest.raises(ValueError):
        parse_overrides(["search.explore"])


# -- kill -9 and resume, through the command path, in subprocesses -------------------------------------

SCRIPT = """
import sys, time
from dits.engine.hf import HFEngine
from dits.cli import build_parser

delay = float(sys.argv[1])
if delay:
    original = HFEngine.generate
    def slow(self, views, sampling, seeds=None):
        time.sleep(delay)
        return original(self, views, sampling, seeds=seeds)
    HFEngine.generate = slow
args = build_parser().parse_args(sys.argv[2:])
sys.exit(args.func(args))
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the embedded model's tokenizer (chat template included)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from dits.models import resolve_model

    out = tmp_path_factory.mktemp("tiny_model")
    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _command(script: Path, model: Path, out: Path, delay: float) -> list[str]:
    sets = [
        f"engine.model={model}",
        "engine.token_budget=4096",
        "task.knobs={hops: 1, n_distractor: 0}",
        "search.explore=2",
        "search.expand=2",
        "protocol.max_turns=3",
        "protocol.max_new_tokens=8",
        "protocol.worked_example=false",
    ]
    args = [sys.executable, str(script), str(delay), "synthesize", "--out", str(out), "--limit", "4"]
    args += ["--shard-size", "1", "--tau", "-10", "--min-gap", "0", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args


def _env() -> dict[str, str]:
    # One thread: the tiny model's matmuls are far faster without OpenMP synchronisation, especially on
    # a shared 2-core machine (74 s -> 5 s per run measured); the results are identical either way.
    env = {"PYTHONPATH": str(REPO / "src"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return {**os.environ, **env}


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, tiny_model):
    script = tmp_path / "run_synth.py"
    script.write_text(SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_command(script, tiny_model, ref_dir, 0), check=True, env=_env(), capture_output=True)

    # Slowed down (0.3 s per generate call) so the kill lands between trees, not after the last one.
    proc = subprocess.Popen(
        _command(script, tiny_model, run_dir, 0.3),
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    trees_file = run_dir / "trees.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if trees_file.exists() and trees_file.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished (or failed) before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = trees_file.read_bytes()
    n_before = before.count(b"\n")
    assert 1 <= n_before < 4
    t_norm_before = (run_dir / "t_norm.json").read_text()
    # Simulate a write torn by the crash: half a tree at the end of the file.
    with trees_file.open("ab") as f:
        f.write(before.splitlines(keepends=True)[0][:200])

    done = subprocess.run(
        _command(script, tiny_model, run_dir, 0), env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]

    got, ref = tree_lines(trees_file), tree_lines(ref_dir / "trees.jsonl")
    ids = [t["task_id"] for t in got]
    assert len(ids) == len(set(ids)) == 4
    assert trees_file.read_bytes().startswith(before)  # the trees found were kept, not regrown
    key = lambda t: t["task_id"]  # noqa: E731
    assert sorted(got, key=key) == sorted(ref, key=key)
    assert (run_dir / "t_norm.json").read_text() == t_norm_before
    assert json.loads(t_norm_before)["t_norm"] == json.loads((ref_dir / "t_norm.json").read_text())["t_norm"]
    assert (run_dir / "pairs.jsonl").read_text() == (ref_dir / "pairs.jsonl").read_text()
    assert read_jsonl(run_dir / "pairs.jsonl", PreferencePair)
