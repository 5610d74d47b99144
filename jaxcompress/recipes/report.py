"""Writing a run's report as JSON, Markdown and a plot (accuracy vs file bytes)."""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Mapping, Optional


def format_accuracy(row: dict, key: str) -> str:
    """``row[key]`` as a percentage (a perplexity as a number), with its ``KEY_std`` over seeds when
    there is one, else ``-``."""
    value = row.get(key)
    if value is None:
        return "-"
    std = row.get(f"{key}_std")
    if "perplexity" in key:
        return f"{value:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return f"{value:.2%}" + (f" ± {std:.2%}" if std is not None else "")


def is_text_report(report: dict) -> bool:
    """Whether the report is of a language model on a byte-level corpus (scored by perplexity)."""
    return report.get("split", {}).get("unit") == "bytes"


def paired_comparison(runs: list[list[dict]], reference: Optional[str], key: str = "test_accuracy",
                      level: float = 0.95, references: Optional[Mapping[str, str]] = None) -> list[dict]:
    """Each stage against ``reference``, seed by seed: the paired differences of ``key`` and a t-interval.

    With ``n`` seeds, ``d_i = stage_i - reference_i``; ``mean`` and ``std`` (``ddof=1``) of the
    ``d_i``; ``t = mean / (std / sqrt(n))``; the ``level`` interval ``mean ± t_q * std / sqrt(n)``
    with Student's quantile at ``n - 1`` degrees of freedom. ``within_spread`` says the interval
    holds 0: the seeds show no difference (not proof of none). With one seed, or a reference row
    missing ``key``, only the differences are given.

    Args:
      runs: per seed, the stage rows (``run_recipe``'s ``runs[i]["stages"]``).
      reference: the ``stage`` name compared against (``None``: only the stages in ``references``).
      key: the row value compared (higher is better, e.g. ``'test_accuracy'``).
      level: the interval's coverage, in (0, 1).
      references: ``{stage: its own reference}``, overriding ``reference`` for those stages.

    Returns:
      One dict per other stage with ``stage, name, reference, key, differences, mean, std, t,
      interval, within_spread`` (``None`` where undefined).

    Raises:
      ValueError: ``reference`` is not a stage of every run, or ``level`` is not in (0, 1).

    Example:
      >>> runs = [[{"stage": "a", "name": "a", "acc": 0.90}, {"stage": "b", "name": "b", "acc": 0.91}],
      ...         [{"stage": "a", "name": "a", "acc": 0.92}, {"stage": "b", "name": "b", "acc": 0.92}]]
      >>> p = paired_comparison(runs, "a", "acc")[0]
      >>> [round(d, 4) for d in p["differences"]], round(p["mean"], 4), round(p["t"], 3), p["within_spread"]
      ([0.01, 0.0], 0.005, 1.0, True)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), e.g. 0.95, got {level!r}.")
    by_stage = [{r["stage"]: r for r in rows} for rows in runs]
    references = dict(references or {})
    for ref in {reference, *references.values()} - {None}:
        if not runs or any(ref not in rows for rows in by_stage):
            raise ValueError(f"reference {ref!r} is not a stage of every run; stages: "
                             f"{[r['stage'] for r in runs[0]] if runs else []}.")
    out = []
    for row in runs[0]:
        ref = references.get(row["stage"], reference)
        if ref is None or row["stage"] == ref or row.get(key) is None:
            continue
        pairs = [(rows[row["stage"]].get(key), rows[ref].get(key)) for rows in by_stage]
        if any(a is None or b is None for a, b in pairs):
            continue
        d = [float(a) - float(b) for a, b in pairs]
        n, mean = len(d), math.fsum(d) / len(d)
        std = t = interval = within = None
        if n > 1:
            from scipy.stats import t as student

            std = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
            half = float(student.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
            t = mean / (std / math.sqrt(n)) if std > 0 else None
            interval = [mean - half, mean + half]
            within = interval[0] <= 0.0 <= interval[1]
        out.append({"stage": row["stage"], "name": row["name"], "reference": ref, "key": key,
                    "differences": d, "mean": mean, "std": std, "t": t, "level": level,
                    "interval": interval, "within_spread": within})
    return out


def _points(value: Optional[float], key: str = "accuracy") -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if "perplexity" in key else f"{100 * value:+.2f}"


def _paired_lines(report: dict) -> list[str]:
    paired = report.get("paired")
    if not paired:
        return []
    names = {s["stage"]: s["name"] for s in report["stages"]}
    refs = list(dict.fromkeys(p["reference"] for p in paired))
    one = len(refs) == 1
    against = f"against {names.get(refs[0], refs[0])!r}" if one else "against each stage's reference"
    seeds = report.get("seeds", [])
    key = paired[0]["key"]
    points = functools.partial(_points, key=key)
    unit, scale = ("", 1) if "perplexity" in key else ("points ", 100)
    lines = ["", f"Paired by seed {against}: the difference in {key.replace('_', ' ')} "
             f"({'perplexity' if scale == 1 else 'percentage points'}, this stage minus the reference) on each seed, "
             "its mean, standard deviation and "
             f"t statistic, and the {paired[0]['level']:.0%} t-interval of the mean difference.", "",
             "| stage | " + ("" if one else "reference | ") + " | ".join(f"seed {s}" for s in seeds)
             + " | mean | std | t | interval | within the seeds' spread |",
             "| --- | " + ("" if one else "--- | ") + " | ".join("---:" for _ in seeds)
             + " | ---: | ---: | ---: | ---: | --- |"]
    for p in paired:
        interval = "-" if p["interval"] is None else f"[{points(p['interval'][0])}, {points(p['interval'][1])}]"
        verdict = {None: "-", True: "yes: the interval holds 0", False: "no: the interval excludes 0"}[p["within_spread"]]
        std = "-" if p["std"] is None else f"{scale * p['std']:.{3 if scale == 1 else 2}f}"
        t = "-" if p["t"] is None else f"{p['t']:.2f}"
        lines.append(f"| {p['name']} | " + ("" if one else f"{names.get(p['reference'], p['reference'])} | ")
                     + " | ".join(points(d) for d in p["differences"])
                     + f" | {points(p['mean'])} | {std} | {t} | {interval} | {verdict} |")
    lines.append("")
    for p in paired:
        if p["within_spread"] is None:
            continue
        ref = names.get(p["reference"], p["reference"])
        side = "higher" if p["mean"] > 0 else "lower"
        every = sum((d > 0) == (p["mean"] > 0) and d != 0 for d in p["differences"]) == len(p["differences"])
        lines.append(f"- {p['name']} " + ("matches" if p["within_spread"] else "does not match")
                     + f" {ref!r} within the seeds' spread: {abs(scale * p['mean']):.{3 if scale == 1 else 2}f} {unit}{side} "
                     "on average"
                     + (f", {side} on every seed" if every else "")
                     + (", a difference these seeds cannot tell from 0." if p["within_spread"] else "."))
    return lines


def training_record(report: dict) -> list[dict]:
    """How far each training stage's model had converged, from the validation curves (first seed).

    A stage's curve continues the curves of the training stages its model comes from (``from``),
    so the record is over all the steps that trained the model: for each stage with a curve, the
    validation metric at the first evaluation and at the end, and its relative change over the last
    quarter of those steps (from the first evaluation at or after three quarters of them to the
    end: a perplexity that still falls by more than 1% there is still improving), and, for a stage
    that continues another (``from``), its relative change from that stage's end to its own end:
    what its own steps bought. Where training restarts its learning-rate schedule (a new warm-up
    and decay per stage), the last quarter starts inside a cycle and mixes in the restart's bump;
    the change from end to end compares two models at the same point of their schedules.

    Example:
      >>> r = {"split": {"unit": "bytes"}, "config": {"stages": [{"name": "a"}]}, "stages": [
      ...     {"stage": "a", "name": "a", "validation_curve": [
      ...         {"step": s, "validation_perplexity": p} for s, p in ((1, 4.0), (2, 3.0), (3, 2.5), (4, 2.45))]}]}
      >>> [(t["steps"], t["from_step"], round(t["change"], 4), t["stage_change"]) for t in training_record(r)]
      [(4, 3, -0.02, None)]
    """
    key = "validation_perplexity" if is_text_report(report) else "validation_accuracy"
    configs = {c["name"]: c for c in report.get("config", {}).get("stages", [])}
    rows = {s["stage"]: s for s in report["stages"] if s.get("stage")}

    def curve(name):
        """``(points, steps)``: the evaluations ``(step in all, value)`` of the stage's model and its
        training steps in all, through the stages it comes from."""
        row, config = rows.get(name), configs.get(name, {})
        points = [(p["step"], p[key]) for p in (row or {}).get("validation_curve") or [] if p.get(key) is not None]
        if not points:
            return [], 0
        before, offset = curve(config["from"]) if config.get("from") in rows else ([], 0)
        steps = max(int(row.get("steps") or 0), points[-1][0])
        return before + [(offset + step, value) for step, value in points], offset + steps

    out = []
    for s in report["stages"]:
        if not s.get("validation_curve"):
            continue
        points, total = curve(s["stage"])
        start = next(p for p in points if p[0] >= 0.75 * total)
        parent = rows.get(configs.get(s["stage"], {}).get("from"))
        before = None
        if parent is not None and parent.get("validation_curve"):
            before = parent.get(key) if parent.get(key) is not None else parent["validation_curve"][-1][key]
        out.append({"stage": s["stage"], "name": s["name"], "metric": key, "steps": total, "first": points[0][1],
                    "from_step": start[0], "at_from_step": start[1], "last": points[-1][1],
                    "change": points[-1][1] / start[1] - 1.0,
                    "stage_change": None if before is None else points[-1][1] / before - 1.0})
    return out


def _training_lines(report: dict) -> list[str]:
    record = training_record(report)
    if not record:
        return []
    metric = record[0]["metric"].replace("_", " ")
    fmt = (lambda v: f"{v:.3f}") if "perplexity" in metric else (lambda v: f"{v:.2%}")
    lines = ["", f"Training record ({metric} of the first seed, over all the steps that trained each stage's model; "
             "last quarter: from the first evaluation at or after three quarters of them):", "",
             f"| stage | steps in all | first evaluation | last quarter from step | there | end | change over the "
             "last quarter | change over the stage's own steps (end of the stage it continues to its end) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in record:
        own = "-" if t["stage_change"] is None else f"{t['stage_change']:+.2%}"
        lines.append(f"| {t['name']} | {t['steps']:,} | {fmt(t['first'])} | {t['from_step']:,} | {fmt(t['at_from_step'])} "
                     f"| {fmt(t['last'])} | {t['change']:+.2%} | {own} |")
    return lines


def _published_lines(report: dict) -> list[str]:
    published = report.get("config", {}).get("published")
    if not published:
        return []
    rows = {s["stage"]: s for s in report["stages"]}
    lines = ["", f"Published: {published['source']}.", "", "| stage | our test error | published test error |",
             "| --- | ---: | ---: |"]
    for stage, error in published["test_error"].items():
        s = rows[stage]
        ours = "-" if s.get("test_accuracy") is None else f"{1 - s['test_accuracy']:.2%}" + (
            f" ± {s['test_accuracy_std']:.2%}" if s.get("test_accuracy_std") is not None else "")
        lines.append(f"| {s['name']} | {ours} | {error:.2f}% |")
    return lines


def _layer_lines(report: dict) -> list[str]:
    """The sparsity of each pruned layer: one table per model (stages with the same layers)."""
    pruned = [s for s in report["stages"] if s.get("layer_sparsity")]
    if not pruned:
        return []
    models: dict[tuple, list] = {}
    for s in pruned:
        models.setdefault(tuple(s["layer_sparsity"]), []).append(s)
    lines = ["", "Sparsity of each pruned layer" + (" (mean over seeds)" if len(report.get("seeds", [0])) > 1 else "")
             + "; where a stage allocated sparsities by sensitivity (each layer pruned alone by magnitude, scored on "
             "the validation split), the allocation follows in brackets."]
    for layers, stages in models.items():
        lines += ["", "| stage | " + " | ".join(layers) + " | total |",
                  "| --- | " + " | ".join("---:" for _ in layers) + " | ---: |"]
        for s in stages:
            alloc = s.get("allocated_sparsity") or {}
            if s.get("budget_allocation"):
                alloc = {}  # per seed in the budget table below
            cells = [f"{s['layer_sparsity'][k]:.1%}" + (f" ({alloc[k]:.1%})" if k in alloc else "") for k in layers]
            lines.append(f"| {s['name']} | " + " | ".join(cells) + f" | {s['sparsity']:.1%} |")
    return lines + _budget_lines(report)


def _factor_lines(report: dict) -> list[str]:
    """Per factorize stage: its ranks, and validation accuracy right after the SVD and after fine-tuning."""
    rows = [s for s in report["stages"] if s.get("ranks")]
    if not rows:
        return []
    lines = ["", "Factorized stages (truncated SVD of the named layers, then the factors fine-tuned): validation "
             "accuracy right after the SVD, before any training, and after the stage's fine-tuning.", "",
             "| stage | ranks | mode | validation after SVD | validation after fine-tuning |", "| --- | --- | --- | ---: | ---: |"]
    for s in rows:
        ranks = ", ".join(f"{k} {v:g}" for k, v in s["ranks"].items())
        lines.append(f"| {s['name']} | {ranks} | {s['mode']} | {format_accuracy(s, 'validation_accuracy_factored')} | "
                     f"{format_accuracy(s, 'validation_accuracy')} |")
    return lines


def _budget_lines(report: dict) -> list[str]:
    """Per seed, what each budget allocation aimed at and what its file came to."""
    rows = [(run["seed"], s) for run in report.get("runs", [{"seed": None, "stages": report["stages"]}])
            for s in run["stages"] if s.get("budget_allocation")]
    if not rows:
        return []
    lines = ["", "Budget allocations (each layer compressed alone over the grids, scored on the validation split and "
             "packed; one option per layer chosen exactly for the least predicted accuracy drop within the budget, "
             "the one-shot file saved to check the prediction): per layer sparsity / bits, per seed.", "",
             "| stage | seed | budget bytes | predicted drop | predicted bytes | one-shot file bytes | file bytes after "
             "fine-tuning | within budget | layers |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
    for seed, s in rows:
        b = s["budget_allocation"]
        last = b["tries"][-1]
        budget = "-" if b["budget_bytes"] is None else f"{b['budget_bytes']:,}"
        within = "-" if b["budget_bytes"] is None else ("yes" if s["file_bytes"] <= b["budget_bytes"] else "NO")
        layers = ", ".join(f"{k} {v['sparsity']:.0%}/{v['bits']}" for k, v in b["layers"].items())
        lines.append(f"| {s['name']} | {seed} | {budget} | {b['predicted_drop']:.2%} | {last['predicted_file_bytes']:,} | "
                     f"{last['one_shot_file_bytes']:,} | {s['file_bytes']:,} | {within} | {layers} |")
    return lines


def report_markdown(report: dict) -> str:
    """Renders a run's report (from ``run_recipe``) as a Markdown table."""
    seeds = report.get("seeds", [0])
    text = is_text_report(report)
    lines = [
        f"# jaxcompress {report.get('recipe', 'demo')} on {report['dataset']}",
        "",
        *([report["config"]["description"], ""] if report.get("config", {}).get("description") else []),
        f"Data: {report['source']}. Environment: {report.get('environment', {})}.",
    ]
    if "split" in report:
        s = report["split"]
        if text:
            lines.append(f"Split: {s['train']:,} train / {s['validation']:,} validation / {s['test']:,} test bytes (whole "
                         f"files, split by path hash), windows of {s['seq_len']} bytes. Seeds: {seeds}"
                         + (" (scores are mean ± standard deviation)." if len(seeds) > 1 else "."))
        else:
            lines.append(f"Split: {s['train']:,} train / {s['validation']:,} validation (carved from the training set "
                         f"with seed {s['split_seed']}) / {s['test']:,} test. Seeds: {seeds}"
                         + (" (accuracies are mean ± standard deviation)." if len(seeds) > 1 else "."))
    if "selection" in report:
        lines.append(f"Selection: {report['selection']}.")
    scores = (("steps", "validation_perplexity", "test_perplexity", "test_accuracy") if text else
              ("epochs (total)", "validation_accuracy", "test_accuracy"))
    titles = {"validation_perplexity": "validation perplexity", "test_perplexity": "test perplexity",
              "test_accuracy": "test next-byte accuracy" if text else "test accuracy",
              "validation_accuracy": "validation accuracy"}
    lines += [
        "",
        f"| stage | {scores[0]} | " + " | ".join(titles[k] for k in scores[1:]) + " | params | non-zero | weight bits "
        "| float32 bytes | file bytes | ratio | seconds |",
        "| --- | " + " | ".join("---:" for _ in scores) + " | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report["stages"]:
        ratio = s["bytes_float32"] / max(s["file_bytes"], 1)
        if text:
            length = f"{s.get('steps', 0):,.0f}"
        else:
            length = "-" if s.get("epochs") is None else f"{s['epochs']:g}" + (
                f" ({s['total_epochs']:g})" if s.get("total_epochs", s["epochs"]) != s["epochs"] else "")
        lines.append(
            f"| {s['name']} | {length} | " + " | ".join(format_accuracy(s, k) for k in scores[1:]) + " | "
            f"{s['params']:,.0f} | {s['nonzero_params']:,.0f} | {s['weight_bits']:.3g} | {s['bytes_float32']:,.0f} | "
            f"{s['file_bytes']:,.0f} | {ratio:.1f}x | {s['seconds']:.1f} |"
        )
    lines += [
        "",
        "File bytes are the size on disk of each stage's saved artifact (`jaxcompress.export.save`: packed",
        "integer codes, sparse positions as a bitmask or relative indices, Huffman-coded streams, scales,",
        "float32 biases, and the checked metadata). The ratio is float32 bytes over file bytes. "
        + ("Perplexity is per byte (exp of the mean next-byte negative log-likelihood over every byte of the "
           "split once, in non-overlapping windows); steps: the stage's own training steps (0: no training)."
           if text else "Epochs: the\nstage's own, and in brackets its whole budget with the stages its model comes from."),
    ]
    lines += (_training_lines(report) + _paired_lines(report) + _published_lines(report) + _layer_lines(report)
              + _factor_lines(report))
    if report["stages"]:
        lines.append("")
    for s in report["stages"]:
        if s.get("exported_file_bytes") is None:
            continue
        metric = "perplexity" if text else "accuracy"
        scores = [f"{format_accuracy(s, key)} on the {split}" for key, split in
                  ((f"validation_{metric}_from_file", "validation split"), (f"test_{metric}_from_file", "test set"))
                  if s.get(key) is not None]
        if text and scores:
            scores[0] = "perplexity " + scores[0]
        lines.append(f"The model of stage {s['name']!r} saved to `{s['exported']}` ({s['exported_file_bytes']:,.0f}"
                     + (f" ± {s['exported_file_bytes_std']:,.0f}" if s.get("exported_file_bytes_std") is not None else "")
                     + f" bytes, {s['bytes_float32'] / s['exported_file_bytes']:.1f}x its float32 bytes)"
                     + (" scores " + " and ".join(scores) + " loaded back from that file." if scores else "."))
    return "\n".join(lines) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both size (lower) and accuracy (higher).

    Example:
      >>> pareto_front([(10, 0.9), (5, 0.95), (20, 0.99), (30, 0.98)])
      [1, 2]
    """
    front = []
    for i, (b, a) in enumerate(points):
        if not any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for j, (b2, a2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plot_accuracy_vs_bytes(series: dict[str, list[dict]], path: str | Path, title: str,
                           key: str = "test_accuracy") -> Path:
    """Plots ``key`` (test accuracy, or test perplexity: lower is better) against file bytes for
    each series of stage rows, with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 1.0 if "perplexity" in key else 100.0
    sign = -1.0 if "perplexity" in key else 1.0  # the front keeps the best: high accuracy, low perplexity
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    everything = []
    for label, rows in series.items():
        xs = [r["file_bytes"] / 1024 for r in rows]
        ys = [scale * r[key] for r in rows]
        errs = [scale * r.get(f"{key}_std", 0.0) for r in rows]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=2, label=label if len(series) > 1 else None)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["name"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        everything += list(zip(xs, ys))
    front = [everything[i] for i in pareto_front([(x, sign * y) for x, y in everything])]
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel("test perplexity (per byte)" if "perplexity" in key else "test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Writes ``report.json``, ``report.md`` and ``report.png`` (accuracy vs file bytes) to ``out_dir``.

    The plot is left out when a stage has no test accuracy (a run with ``score_test = false``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(report_markdown(report))
    if any(s.get("test_accuracy") is None for s in report["stages"]):
        return paths[:2]  # a run that did not score the test set has no test accuracy to plot
    plot_accuracy_vs_bytes({report.get("recipe", "demo"): report["stages"]}, paths[2],
                           f"jaxcompress {report.get('recipe', 'demo')}: {report['dataset']}",
                           key="test_perplexity" if is_text_report(report) else "test_accuracy")
    return paths
