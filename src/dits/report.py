"""``dits report RUN``: a markdown table and PNG plots built only from a run directory's artifacts.

Per method and iteration: the test metric with its 95% bootstrap interval, mean communication tokens, pairs
kept, and the ledger FLOPs of that method's lineage so far (every non-evaluation stage it depends on,
shared stages included: the synthesized pool is charged to every method, its influence scores to each
method that read them). Plots: metric vs. communication tokens, metric vs. FLOPs per iteration, and
influence vs. Q(best) of the candidate pairs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from dits.artifacts import (
    PAIRS_FILE,
    SCORES_FILE,
    StageManifest,
    read_jsonl,
    read_manifest,
    write_text_atomic,
)
from dits.records import InfluenceScore, PreferencePair, pair_key
from dits.select import needs_scores

REPORT_FILE = "report.md"
_ITER = re.compile(r"^iter_(\d+)$")


class Row(BaseModel):
    method: str
    iteration: int | None
    """None: the untrained model."""
    metric: float
    low: float
    high: float
    comm_tokens: float
    n: int
    pairs_kept: int | None
    flops: float


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


def collect_rows(run_dir: Path) -> list[Row]:
    manifests = stage_manifests(run_dir)
    methods = sorted({m.method for _, m in manifests if m.method is not None})
    rows: list[Row] = []
    for _, m in manifests:
        if m.stage == "evaluate" and m.iteration is None:
            rows.append(_row("untrained", None, m, None, 0.0))
    for method in methods or [None]:
        flops = 0.0
        iterations = sorted({m.iteration for _, m in manifests if m.iteration is not None})
        for it in iterations:
            mine = [m for _, m in manifests if m.iteration == it and m.method in (None, method)]
            flops += sum(m.ledger.get("flops", 0.0) for m in mine if _charged(m, method))
            kept = next((int(m.counts["kept"]) for m in mine if m.stage == "select"), None)
            for m in mine:
                if m.stage == "evaluate":
                    rows.append(_row(method or "model", it, m, kept, flops))
    return rows


def _charged(m: StageManifest, method: str | None) -> bool:
    """Whether ``method``'s budget pays for stage ``m``: evaluation never; a shared influence stage only
    for the methods that read its scores."""
    if m.stage == "evaluate":
        return False
    return not (m.stage == "influence" and m.method is None and not needs_scores(method or ""))


def _row(method: str, it: int | None, m: StageManifest, kept: int | None, flops: float) -> Row:
    c = m.counts
    return Row(method=method, iteration=it, metric=c["metric"], low=c["low"], high=c["high"],
               comm_tokens=c["comm_tokens"], n=int(c["n"]), pairs_kept=kept, flops=flops)  # fmt: skip


def markdown_table(rows: list[Row]) -> str:
    lines = [
        "| method | iteration | test metric | 95% CI | comm. tokens | pairs kept | ledger FLOPs |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        it = "-" if r.iteration is None else str(r.iteration)
        kept = "-" if r.pairs_kept is None else str(r.pairs_kept)
        lines.append(
            f"| {r.method} | {it} | {r.metric:.3f} | [{r.low:.3f}, {r.high:.3f}] | {r.comm_tokens:.1f} "
            f"| {kept} | {r.flops:.3g} |"
        )
    return "\n".join(lines)


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
            q = {
                pair_key(p): p.q_chosen
                for p in read_jsonl(search_dir / PAIRS_FILE, PreferencePair, repair=False)
            }
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
                if r.iteration is not None:
                    ax.annotate(f"it{r.iteration}", (x, r.metric), fontsize=7)
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


def write_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` (and its PNGs) from the run's artifacts; return its path."""
    rows = collect_rows(run_dir)
    if not rows:
        raise FileNotFoundError(f"{run_dir} has no finished evaluation stage to report")
    stages = stage_manifests(run_dir)
    parts = [
        f"# Run `{run_dir.name}`",
        "",
        "Test metric with its 95% bootstrap interval; ledger FLOPs are those of the method's lineage up to "
        "that iteration (evaluation excluded; shared stages charged to every method that read them).",
        "",
        markdown_table(rows),
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
