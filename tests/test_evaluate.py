"""`dits evaluate`: summaries equal a recomputation from the written transcripts; resume; intervals."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dits.artifacts import read_jsonl
from dits.cli import main
from dits.evaluate import EvalRecord, paired_metrics
from dits.mas.protocol import ProtocolConfig
from dits.stages.evaluate import evaluate_to_dir
from dits.stats import bootstrap_ci, paired_bootstrap
from dits.tasks import load_examples
from dits.tasks.builtin import make_builtin
from dits.tasks.loaders import default_data_root
from dits.tasks.metrics import score_answer
from tests.fakes import ScriptedEngine

SMALL = ProtocolConfig(max_turns=3, max_new_tokens=16)


def _check_summary_against_transcripts(out_dir, examples):
    summary = json.loads((out_dir / "summary.json").read_text())
    records = read_jsonl(out_dir / "transcripts.jsonl", EvalRecord)
    by_id = {ex.id: ex for ex in examples}
    assert sorted(r.transcript.example_id for r in records) == sorted(by_id)
    metrics = []
    for r in records:
        tr = r.transcript
        ok = tr.stop_reason in ("agreed", "answered")
        metrics.append(score_answer(by_id[tr.example_id], tr.answer) if ok else 0.0)
        assert tr.metric == metrics[-1]
    assert summary["n"] == len(examples)
    assert summary["metric"]["mean"] == pytest.approx(np.mean(metrics))
    assert summary["comm_tokens"] == pytest.approx(
        np.mean([sum(t.tokens for t in r.transcript.turns) for r in records])
    )
    assert sum(summary["stop_reasons"].values()) == len(examples)
    assert summary["metric"]["low"] <= summary["metric"]["mean"] <= summary["metric"]["high"]


@pytest.mark.slow
def test_evaluate_builtin_and_real_datasets_on_embedded_model(engine, tmp_path):
    root = default_data_root()
    cases = [
        (make_builtin("facts", "test", 3, 0), "mas"),
        (make_builtin("arith", "test", 2, 0), "cot"),
        (load_examples("gsm8k", "dev", root / "gsm8k", limit=2), "mas"),
        (load_examples("hotpotqa", "dev", root / "hotpotqa", limit=2), "mas"),
    ]
    for examples, method in cases:
        out = tmp_path / f"{examples[0].dataset}-{method}"
        evaluate_to_dir(engine, examples, method, SMALL, out, progress=False)
        _check_summary_against_transcripts(out, examples)


def test_evaluate_resumes_after_a_kill(tmp_path):
    examples = make_builtin("facts", "test", 4, 0)
    eng = ScriptedEngine(lambda v: "<A>Zorvath</A>")
    evaluate_to_dir(eng, examples, "mas", SMALL, tmp_path, chunk=2, progress=False)
    path = tmp_path / "transcripts.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed mid-append
    eng2 = ScriptedEngine(lambda v: "<A>Zorvath</A>")
    evaluate_to_dir(eng2, examples, "mas", SMALL, tmp_path, chunk=2, progress=False)
    assert sum(len(c) for c in eng2.calls) == 2 * 2  # only the 2 missing tasks, 2 turns each
    _check_summary_against_transcripts(tmp_path, examples)


def test_cli_evaluate_prints_table(tmp_path, capsys):
    code = main(["evaluate", "--dataset", "arith", "--limit", "2", "--method", "cot", "--max-new-tokens", "8",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "arith-test-cot" / "summary.json").read_text())
    assert f"| cot | arith | test | 2 | {summary['metric']['mean']:.3f} |" in printed


def test_bootstrap_interval_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.random(40) < 0.3
    ci = bootstrap_ci(x.astype(float))
    means = [x[rng.integers(0, len(x), len(x))].mean() for _ in range(4000)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    assert ci.mean == pytest.approx(x.mean())
    assert abs(ci.low - lo) < 0.04 and abs(ci.high - hi) < 0.04
    const = bootstrap_ci([1.0, 1.0, 1.0])
    assert (const.low, const.mean, const.high) == (1.0, 1.0, 1.0)


def _exact_bootstrap(d: list[float]) -> tuple[float, float]:
    """The percentile interval of the exact bootstrap distribution: every one of the n^n resamples."""
    n = len(d)
    means = [sum(d[i] for i in idx) / n for idx in itertools.product(range(n), repeat=n)]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def test_paired_interval_equals_the_exact_bootstrap_of_the_differences():
    # Two models on the same 5 tasks: they differ on tasks 0 and 3. The difference's exact bootstrap
    # distribution is K/5 with K ~ Binomial(5, 2/5): P(K=0) = 0.078 and P(K<=4) = 0.990, so its 95%
    # percentile interval is exactly [0, 0.8], whatever the resampling noise.
    a, b = [1.0, 0.0, 1.0, 1.0, 0.5], [0.0, 0.0, 1.0, 0.0, 0.5]
    ci = paired_bootstrap(a, b)
    assert (ci.mean, ci.low, ci.high) == (pytest.approx(0.4), 0.0, pytest.approx(0.8))
    assert _exact_bootstrap([x - y for x, y in zip(a, b, strict=True)]) == (0.0, pytest.approx(0.8))
    # Unpaired intervals of the two means overlap; the paired one does not cross zero below.
    assert bootstrap_ci(b).high > bootstrap_ci(a).low
    # Graded metrics: within the resampling noise of 2000 draws of the exact distribution.
    c, e = [0.9, 0.2, 0.7, 0.4, 1.0, 0.3], [0.5, 0.25, 0.1, 0.4, 0.6, 0.35]
    ci = paired_bootstrap(c, e)
    lo, hi = _exact_bootstrap([x - y for x, y in zip(c, e, strict=True)])
    assert ci.mean == pytest.approx(np.mean(c) - np.mean(e))
    assert abs(ci.low - lo) < 0.02 and abs(ci.high - hi) < 0.02
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 0.0])


def test_paired_metrics_align_by_task_and_refuse_different_task_sets():
    from dits.mas.dialogue import Transcript

    def rec(eid: str, metric: float) -> EvalRecord:
        tr = Transcript(example_id=eid, turns=[], answer="", metric=metric, stop_reason="agreed")
        return EvalRecord(method="mas", dataset="facts", split="test", transcript=tr)

    a = [rec("t2", 1.0), rec("t1", 0.0)]
    b = [rec("t1", 0.5), rec("t2", 0.25)]
    assert paired_metrics(a, b) == ([0.0, 1.0], [0.5, 0.25])
    with pytest.raises(ValueError, match="different tasks"):
        paired_metrics(a, [rec("t1", 0.5)])


def test_cli_evaluate_with_an_adapter_and_mas_sc(engine, tmp_path, monkeypatch):
    """``--adapter`` loads a saved LoRA (it used to fail: PEFT cannot register an adapter named "eval",
    nn.Module.eval is taken) and ``mas-sc --samples 2`` writes its own k-tagged directory. A zero LoRA gives
    the base model's greedy transcripts; each mas-sc record holds its 2 conversations' turns."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=True)
    peft_model = get_peft_model(engine.base, cfg, adapter_name="tmp")
    peft_model.save_pretrained(tmp_path / "zero", selected_adapters=["tmp"])
    assert peft_model.unload() is engine.base
    adapter = next(p.parent for p in (tmp_path / "zero").rglob("adapter_config.json"))
    monkeypatch.setattr("dits.engine.make_engine", lambda *_a, **_k: engine)
    common = ["evaluate", "--dataset", "arith", "--limit", "2", "--max-new-tokens", "8", "--max-turns", "2"]
    try:
        assert main([*common, "--out", str(tmp_path / "base")]) == 0
        lora = ["--adapter", str(adapter), "--method", "mas", "--method", "mas-sc", "--samples", "2"]
        assert main([*common, *lora, "--out", str(tmp_path / "lora")]) == 0
    finally:
        engine.set_adapter(None)
        if "evaluated" in engine.adapter_names():
            engine.delete_adapter("evaluated")

    def records(path):  # type: ignore[no-untyped-def]
        return read_jsonl(path / "transcripts.jsonl", EvalRecord)

    base, same = records(tmp_path / "base" / "arith-test-mas"), records(tmp_path / "lora" / "arith-test-mas")
    assert [r.transcript.texts for r in same] == [r.transcript.texts for r in base]
    sc = records(tmp_path / "lora" / "arith-test-mas-sc-k2")
    assert [r.method for r in sc] == ["mas-sc", "mas-sc"]
    assert all(len(r.transcript.turns) == 4 for r in sc)  # 2 conversations x 2 turns (the limit)
