"""Comparing finished runs side by side: one table and one accuracy-vs-bytes Pareto plot.

Runs on text are compared by test perplexity (lower is better), runs on images by test accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from jaxcompress.recipes.report import format_accuracy, is_text_report, pareto_front, plot_accuracy_vs_bytes


def read_reports(dirs: Sequence[str | Path]) -> dict[str, dict]:
    """``{run label: report}`` from each directory's ``report.json`` (label: the directory name).

    Raises:
      ValueError: a directory without a readable ``report.json``.
    """
    reports = {}
    for d in dirs:
        path = Path(d) / "report.json"
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{str(d)!r} holds no readable report.json ({type(e).__name__}: {e}); "
                             "give directories written by `jaxcompress run`.") from None
        label = Path(d).resolve().name
        while label in reports:
            label += "'"
        reports[label] = report
    return reports


def _metric(reports: dict[str, dict]) -> str:
    """``'perplexity'`` when every run is on text, ``'accuracy'`` when every run is on images."""
    kinds = {is_text_report(r) for r in reports.values()}
    if len(kinds) > 1:
        raise ValueError("the runs mix text (scored by perplexity) and images (scored by accuracy); compare runs "
                         "of one kind: " + ", ".join(f"{k} ({'text' if is_text_report(r) else 'images'})"
                                                     for k, r in reports.items()) + ".")
    return "perplexity" if kinds == {True} else "accuracy"


def compare_markdown(reports: dict[str, dict]) -> str:
    """A side-by-side table of every stage of every run, with the Pareto-optimal rows marked."""
    metric = _metric(reports)
    sign = -1.0 if metric == "perplexity" else 1.0  # the front keeps the best: high accuracy, low perplexity
    rows = [(label, s) for label, r in reports.items() for s in r["stages"]]
    scored = [i for i, (_, s) in enumerate(rows) if s.get(f"test_{metric}") is not None]
    front = {scored[j] for j in pareto_front([(rows[i][1]["file_bytes"], sign * rows[i][1][f"test_{metric}"])
                                              for i in scored])}
    lines = [
        "# jaxcompress runs compared",
        "",
        f"| run | recipe | data | seeds | stage | validation {metric} | test {metric} | file bytes | Pareto |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | :---: |",
    ]
    for i, (label, s) in enumerate(rows):
        r = reports[label]
        lines.append(f"| {label} | {r.get('recipe', 'demo')} | {r['dataset']} | {len(r.get('seeds', [0]))} | "
                     f"{s['name']} | {format_accuracy(s, f'validation_{metric}')} | {format_accuracy(s, f'test_{metric}')} | "
                     f"{s['file_bytes']:,.0f} | {'*' if i in front else ''} |")
    lines += ["", "Pareto: no other row is both smaller on disk and at least as "
              + ("good (lower perplexity)" if metric == "perplexity" else "accurate") + " on the test set."]
    return "\n".join(lines) + "\n"


def compare_runs(dirs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Writes ``OUT/compare.md`` and ``OUT/compare.png`` for the runs in ``dirs``; returns their paths."""
    reports = read_reports(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "compare.md"
    md.write_text(compare_markdown(reports))
    metric = _metric(reports)
    scored = {k: [s for s in r["stages"] if s.get(f"test_{metric}") is not None] for k, r in reports.items()}
    png = plot_accuracy_vs_bytes({k: rows for k, rows in scored.items() if rows}, out / "compare.png",
                                 f"test {metric} vs file bytes", key=f"test_{metric}")
    return [md, png]
