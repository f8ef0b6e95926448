"""``dits report RUN``: a markdown table, paired comparisons and PNG plots built only from a run's artifacts.

Per method and iteration: the test metric with its 95% bootstrap interval, mean communication tokens, pairs
kept, and the ledger FLOPs of that method's lineage so far (every non-evaluation stage it depends on,
shared stages included: the synthesized pool is charged to every method, its influence scores to each
method that read them). Comparisons, on each method's last iteration: every trained method against the
untrained model, and every method that reads influence against every one that does not, each as the mean
per-task difference with a paired bootstrap interval over the same test tasks. The same figures go to
``results.json`` (:class:`Results`). The table also holds the evaluation baselines of the untrained model
(``pipeline.baselines``) and each model's mas-sc inference-scaling points (``pipeline.scaling``), and gives
communication tokens relative to the untrained system and to CoT. Plots: metric vs. communication tokens
(the scaling curves included), metric vs. FLOPs per iteration, and influence vs. Q(best) of the pairs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from dits.artifacts import (
    PAIRS_FILE,
    SCORES_FILE,
    TRANSCRIPTS_FILE,
    StageManifest,
    read_jsonl,
    read_manifest,
    write_json_atomic,
    write_text_atomic,
)
from dits.evaluate import EvalRecord, paired_metrics
from dits.ledger import COUNTERS
from dits.records import InfluenceScore, PreferencePair, pair_key
from dits.select import needs_scores
from dits.stats import paired_bootstrap

REPORT_FILE = "report.md"
RESULTS_FILE = "results.json"
UNTRAINED = "untrained"
_ITER = re.compile(r"^iter_(\d+)$")


class Row(BaseModel):
    method: str
    iteration: int | None
    """None: the untrained model."""
    kind: Literal["model", "baseline", "scaling"] = "model"
    """A lineage's evaluation (or the untrained model's), an evaluation baseline on the untrained model
    (``pipeline.baselines``), or a point of a model's mas-sc scaling curve (``pipeline.scaling``)."""
    k: int | None = None
    """Samples per task of ``sc`` / conversations of ``mas-sc``."""
    metric: float
    low: float
    high: float
    comm_tokens: float
    n: int
    pairs_kept: int | None
    flops: float
    tokens: float
    """Ledger tokens of the lineage (every kind: prompt, generated, scored, trained), as ``flops``."""
    eval_dir: str
    """The evaluate stage's directory, relative to the run."""


class Comparison(BaseModel):
    """``method − baseline`` on the same test tasks: mean per-task difference, paired 95% interval."""

    method: str
    baseline: str
    iteration: int | None
    difference: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def sentence(self) -> str:
        verdict = (
            f"the interval excludes zero: {self.method} is {'better' if self.low > 0 else 'worse'}"
            if self.excludes_zero
            else "the interval includes zero: no difference is shown"
        )
        return (
            f"{self.method} − {self.baseline}: {self.difference:+.3f} [{self.low:+.3f}, {self.high:+.3f}] "
            f"over {self.n} tasks; {verdict}."
        )


class Results(BaseModel):
    """``results.json``: each method's last evaluation, the paired comparisons between them, and the
    baselines' and inference-scaling evaluations."""

    run: str
    methods: dict[str, Row]
    comparisons: list[Comparison]
    others: list[Row] = []


def stage_manifests(run_dir: Path) -> list[tuple[str, StageManifest]]:
    """``(folder/stage_dir, manifest)`` of every finished stage: base first, then by iteration, then in the
    order the stages finished."""
    out: list[tuple[str, StageManifest]] = []
    iterations = [d for d in run_dir.glob("iter_*") if _ITER.match(d.name)]
    iterations.sort(key=lambda d: int(d.name[5:]))
    folders = [run_dir / "base", *iterations]
    for folder in folders:
        found = []
        for stage_dir in sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []:
            m = read_manifest(stage_dir)
            if m is not None:
                found.append((f"{folder.name}/{stage_dir.name}", m))
        out += sorted(found, key=lambda item: item[1].finished)  # the order the stages ran in
    return out


EXTRA_STAGES = frozenset({"baseline", "scaling"})
"""Evaluation stages outside the lineages: their ``method`` field names the row, not a lineage."""


def collect_rows(run_dir: Path) -> list[Row]:
    manifests = stage_manifests(run_dir)
    lineage = [(w, m) for w, m in manifests if m.stage not in EXTRA_STAGES]
    methods = sorted({m.method for _, m in lineage if m.method is not None})
    rows: list[Row] = []
    for where, m in lineage:
        if m.stage == "evaluate" and m.iteration is None:
            rows.append(_row(UNTRAINED, None, m, None, {}, where))
    for method in methods or [None]:
        spent: dict[str, float] = {}
        iterations = sorted({m.iteration for _, m in lineage if m.iteration is not None})
        for it in iterations:
            mine = [(w, m) for w, m in lineage if m.iteration == it and m.method in (None, method)]
            for _, m in mine:
                if _charged(m, method):
                    for key, value in m.ledger.items():
                        spent[key] = spent.get(key, 0.0) + value
            kept = next((int(m.counts["kept"]) for _, m in mine if m.stage == "select"), None)
            for where, m in mine:
                if m.stage == "evaluate":
                    rows.append(_row(method or "model", it, m, kept, spent, where))
    return rows + _extra_rows(manifests, rows)


def _extra_rows(manifests: list[tuple[str, StageManifest]], rows: list[Row]) -> list[Row]:
    """Baselines on the untrained model, and each mas-sc point under the model it scales (``q mas-sc``),
    charged as that model's row is."""
    spent = {(r.method, r.iteration): r for r in rows}
    out: list[Row] = []
    for where, m in manifests:
        if m.stage not in EXTRA_STAGES or m.method is None:
            continue
        k = int(m.counts["k"]) if "k" in m.counts else None
        if m.stage == "baseline":
            out.append(
                _row(m.method, None, m, None, {}, where).model_copy(update={"kind": "baseline", "k": k})
            )
            continue
        model = UNTRAINED if m.iteration is None else m.method.rsplit("-k", 1)[0]
        base = spent.get((model, m.iteration))
        row = _row(f"{model} mas-sc", m.iteration, m, None, {}, where)
        if base is not None:
            row = row.model_copy(
                update={"flops": base.flops, "tokens": base.tokens, "pairs_kept": base.pairs_kept}
            )
        out.append(row.model_copy(update={"kind": "scaling", "k": k}))
    return out


def last_rows(rows: list[Row]) -> dict[str, Row]:
    """Each method's row of its last iteration (the untrained model's one row); lineages only."""
    out: dict[str, Row] = {}
    for r in rows:
        if r.kind != "model":
            continue
        if r.method not in out or (r.iteration or 0) >= (out[r.method].iteration or 0):
            out[r.method] = r
    return out


def compare(
    method: str, baseline: str, a: list[EvalRecord], b: list[EvalRecord], it: int | None
) -> Comparison:
    """``method − baseline`` from the two evaluations' records, paired by task."""
    xa, xb = paired_metrics(a, b)
    ci = paired_bootstrap(xa, xb)
    return Comparison(method=method, baseline=baseline, iteration=it, difference=ci.mean, low=ci.low,
                      high=ci.high, n=len(xa))  # fmt: skip


def comparisons(run_dir: Path, last: dict[str, Row]) -> list[Comparison]:
    """On each method's last row (:func:`last_rows`): every trained method against the untrained model;
    every method that reads influence against every trained one that does not (DITS against each Optima
    variant). Each evaluation's transcripts are read once."""
    records = {m: read_jsonl(run_dir / r.eval_dir / TRANSCRIPTS_FILE, EvalRecord) for m, r in last.items()}
    trained = [r for m, r in last.items() if m != UNTRAINED]
    pairs = [(r, UNTRAINED) for r in trained if UNTRAINED in last]
    pairs += [(r, o.method) for r in trained if needs_scores(r.method)
              for o in trained if o.method != r.method and not needs_scores(o.method)]  # fmt: skip
    return [compare(r.method, b, records[r.method], records[b], r.iteration) for r, b in pairs]


def results(run_dir: Path, rows: list[Row] | None = None) -> Results:
    """The figures of ``results.json`` (``rows``: :func:`collect_rows` of the run, if already read)."""
    rows = collect_rows(run_dir) if rows is None else rows
    last = last_rows(rows)
    others = [r for r in rows if r.kind != "model"]
    return Results(run=run_dir.name, methods=last, comparisons=comparisons(run_dir, last), others=others)


def _charged(m: StageManifest, method: str | None) -> bool:
    """Whether ``method``'s budget pays for stage ``m``: evaluation never; a shared influence stage only
    for the methods that read its scores."""
    if m.stage == "evaluate":
        return False
    return not (m.stage == "influence" and m.method is None and not needs_scores(method or ""))


def _row(
    method: str, it: int | None, m: StageManifest, kept: int | None, spent: dict[str, float], where: str
) -> Row:
    c = m.counts
    return Row(method=method, iteration=it, metric=c["metric"], low=c["low"], high=c["high"],
               comm_tokens=c["comm_tokens"], n=int(c["n"]), pairs_kept=kept,
               flops=spent.get("flops", 0.0), tokens=sum(spent.get(k, 0.0) for k in COUNTERS),
               eval_dir=where)  # fmt: skip


def _table(header: list[str], cells: list[list[str]]) -> str:
    """A markdown table from a header and rows of already formatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _it(iteration: int | None) -> str:
    return "-" if iteration is None else str(iteration)


def markdown_table(rows: list[Row]) -> str:
    """One row per evaluation; the token columns are communication tokens per task relative to the
    untrained two-agent system and to single-agent CoT (Optima's token-efficiency result), where the run
    has them."""
    ref = {r.method: r.comm_tokens for r in rows if r.method in (UNTRAINED, "cot") and r.k is None}

    def ratio(r: Row, of: str) -> str:
        return f"{r.comm_tokens / ref[of]:.2f}x" if ref.get(of) else "-"

    header = ["method", "iteration", "test metric", "95% CI", "comm. tokens", "tokens vs untrained",
              "tokens vs CoT", "pairs kept", "ledger FLOPs"]  # fmt: skip
    return _table(header, [
        [r.method + ("" if r.k is None else f" (k={r.k})"), _it(r.iteration), f"{r.metric:.3f}",
         f"[{r.low:.3f}, {r.high:.3f}]", f"{r.comm_tokens:.1f}", ratio(r, UNTRAINED), ratio(r, "cot"),
         "-" if r.pairs_kept is None else str(r.pairs_kept), f"{r.flops:.3g}"]
        for r in rows
    ])  # fmt: skip


def influence_points(run_dir: Path) -> list[tuple[float, float]]:
    """(Q(best), influence) of every scored candidate pair in the run."""
    points: list[tuple[float, float]] = []
    for folder in sorted(run_dir.glob("iter_*")):
        for infl in sorted(folder.glob("influence*")):
            m = read_manifest(infl)
            if m is None:
                continue
            search_dir = folder / infl.name.replace("influence", "search", 1)
            if not (search_dir / PAIRS_FILE).exists():
                continue
            q = {pair_key(p): p.q_chosen for p in read_jsonl(search_dir / PAIRS_FILE, PreferencePair)}
            for s in read_jsonl(infl / SCORES_FILE, InfluenceScore):
                points.extend((q[k], s.score) for k in s.pair_ids if k in q)
    return points


def _plots(run_dir: Path, rows: list[Row]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, str]] = []
    by_method: dict[str, list[Row]] = {}
    for r in rows:
        by_method.setdefault(r.method, []).append(r)

    def save(fig: Any, name: str, title: str) -> None:
        fig.tight_layout()
        fig.savefig(run_dir / name, dpi=100)
        plt.close(fig)
        made.append((title, name))

    for x_of, xlabel, name in (
        (lambda r: r.comm_tokens, "communication tokens per task", "metric_vs_tokens.png"),
        (lambda r: r.flops, "ledger FLOPs (lineage, cumulative)", "metric_vs_flops.png"),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, rs in by_method.items():
            xs, ys = [x_of(r) for r in rs], [r.metric for r in rs]
            err = [[r.metric - r.low for r in rs], [r.high - r.metric for r in rs]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
            for r, x in zip(rs, xs, strict=True):
                label = (
                    f"k{r.k}" if r.kind == "scaling" else None if r.iteration is None else f"it{r.iteration}"
                )
                if label:
                    ax.annotate(label, (x, r.metric), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test metric")
        ax.legend(fontsize=8)
        save(fig, name, f"Test metric vs. {xlabel}")

    points = influence_points(run_dir)
    if points:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=12, alpha=0.7)
        ax.set_xlabel("Q(chosen)")
        ax.set_ylabel("estimated influence")
        save(fig, "influence_vs_q.png", "Influence vs. Q-value of the candidate pairs")
    return made


def comparison_table(comps: list[Comparison]) -> str:
    header = ["method", "baseline", "iteration", "difference", "paired 95% CI", "tasks"]
    return _table(header, [
        [c.method, c.baseline, _it(c.iteration), f"{c.difference:+.3f}", f"[{c.low:+.3f}, {c.high:+.3f}]",
         str(c.n)]
        for c in comps
    ])  # fmt: skip


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` (and its PNGs) and ``run_dir/results.json`` from the run's artifacts;
    return the report's path."""
    rows = collect_rows(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no finished evaluation stage to report")
    stages = stage_manifests(run_dir)
    res = results(run_dir, rows)
    write_json_atomic(run_dir / RESULTS_FILE, res.model_dump(mode="json"))
    parts = [
        f"# Run `{run_dir.name}`",
        "",
        "Test metric with its 95% bootstrap interval; ledger FLOPs are those of the method's lineage up to "
        "that iteration (evaluation excluded; shared stages charged to every method that read them).",
        "",
        markdown_table(rows),
        "",
    ]
    if res.comparisons:
        parts += [
            "## Paired comparisons",
            "",
            "Mean per-task difference of the test metric on the same test tasks, with a paired bootstrap "
            "95% interval (each method's last iteration).",
            "",
            comparison_table(res.comparisons),
            "",
            *[f"- {c.sentence()}" for c in res.comparisons],
            "",
        ]
    for title, name in _plots(run_dir, rows):
        parts += [f"![{title}]({name})", ""]
    parts += ["## Stages", "", "| stage | counts | FLOPs | seconds |", "|---|---|---|---|"]
    for where, m in stages:
        counts = ", ".join(f"{k} {v:g}" for k, v in m.counts.items())
        parts.append(f"| {where} | {counts} | {m.ledger.get('flops', 0.0):.3g} | {m.seconds:.0f} |")
    path = run_dir / REPORT_FILE
    write_text_atomic(path, "\n".join(parts) + "\n")
    return path
