"""Writing a run's report as JSON, Markdown and a plot (accuracy vs file bytes)."""
from __future__ import annotations

import json
from pathlib import Path


def format_accuracy(row: dict, key: str) -> str:
    """``row[key]`` as a percentage, with its ``KEY_std`` over seeds when there is one, else ``-``."""
    value = row.get(key)
    if value is None:
        return "-"
    std = row.get(f"{key}_std")
    return f"{value:.2%}" + (f" ± {std:.2%}" if std is not None else "")


def report_markdown(report: dict) -> str:
    """Renders a run's report (from ``run_recipe``) as a Markdown table."""
    seeds = report.get("seeds", [0])
    lines = [
        f"# jaxcompress {report.get('recipe', 'demo')} on {report['dataset']}",
        "",
        f"Data: {report['source']}. Environment: {report.get('environment', {})}.",
    ]
    if "split" in report:
        s = report["split"]
        lines.append(f"Split: {s['train']:,} train / {s['validation']:,} validation (carved from the training set "
                     f"with seed {s['split_seed']}) / {s['test']:,} test. Seeds: {seeds}"
                     + (" (accuracies are mean ± standard deviation)." if len(seeds) > 1 else "."))
    if "selection" in report:
        lines.append(f"Selection: {report['selection']}.")
    lines += [
        "",
        "| stage | validation accuracy | test accuracy | params | non-zero | weight bits | float32 bytes | file bytes "
        "| ratio | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report["stages"]:
        ratio = s["bytes_float32"] / max(s["file_bytes"], 1)
        lines.append(
            f"| {s['name']} | {format_accuracy(s, 'validation_accuracy')} | {format_accuracy(s, 'test_accuracy')} | "
            f"{s['params']:,.0f} | {s['nonzero_params']:,.0f} | {s['weight_bits']:g} | {s['bytes_float32']:,.0f} | "
            f"{s['file_bytes']:,.0f} | {ratio:.1f}x | {s['seconds']:.1f} |"
        )
    lines += [
        "",
        "File bytes are the size on disk of each stage's saved artifact (`jaxcompress.export.save`: packed",
        "integer codes, sparse positions as a bitmask or relative indices, Huffman-coded streams, scales,",
        "float32 biases, and the checked metadata). The ratio is float32 bytes over file bytes.",
    ]
    for s in report["stages"]:
        if "test_accuracy_from_file" in s:
            where = s.get("exported", s["artifact"])
            lines.append(f"The model of stage {s['name']!r} loaded back from `{where}` scores "
                         f"{s['test_accuracy_from_file']:.2%} on the test set.")
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


def plot_accuracy_vs_bytes(series: dict[str, list[dict]], path: str | Path, title: str) -> Path:
    """Plots test accuracy against file bytes for each series of stage rows, with the Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    everything = []
    for label, rows in series.items():
        xs = [r["file_bytes"] / 1024 for r in rows]
        ys = [100 * r["test_accuracy"] for r in rows]
        errs = [100 * r.get("test_accuracy_std", 0.0) for r in rows]
        ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=2, label=label if len(series) > 1 else None)
        for r, x, y in zip(rows, xs, ys):
            ax.annotate(r["name"], (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        everything += list(zip(xs, ys))
    front = [everything[i] for i in pareto_front(everything)]
    ax.plot([p[0] for p in front], [p[1] for p in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Writes ``report.json``, ``report.md`` and ``report.png`` (accuracy vs file bytes) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(report_markdown(report))
    plot_accuracy_vs_bytes({report.get("recipe", "demo"): report["stages"]}, paths[2],
                           f"jaxcompress {report.get('recipe', 'demo')}: {report['dataset']}")
    return paths
