"""Writing a compression report as JSON, Markdown and a plot."""
from __future__ import annotations

import json
from pathlib import Path


def report_markdown(report: dict) -> str:
    """Renders a demo report as a Markdown table."""
    lines = [
        f"# jaxcompress demo on {report['dataset']}",
        "",
        f"Data: {report['source']}. Environment: {report.get('environment', {})}.",
        "",
        "| stage | test accuracy | params | non-zero | weight bits | float32 bytes | file bytes | ratio | seconds |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report["stages"]:
        ratio = s["bytes_float32"] / max(s["file_bytes"], 1)
        lines.append(
            f"| {s['name']} | {s['test_accuracy']:.2%} | {s['params']:,} | {s['nonzero_params']:,} | "
            f"{s['weight_bits']} | {s['bytes_float32']:,} | {s['file_bytes']:,} | {ratio:.1f}x | {s['seconds']:.1f} |"
        )
    last = report["stages"][-1]
    lines += [
        "",
        "File bytes are the size on disk of each stage's saved artifact (`jaxcompress.export.save`: packed",
        "integer codes, sparse positions as a bitmask or relative indices, Huffman-coded streams, scales,",
        "float32 biases, and the checked metadata). The ratio is float32 bytes over file bytes.",
    ]
    if "test_accuracy_from_file" in last:
        lines.append(f"The final model loaded back from `{last['artifact']}` scores "
                     f"{last['test_accuracy_from_file']:.2%} on the test set.")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Writes ``report.json``, ``report.md`` and ``report.png`` (accuracy vs stored size) to ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md", out / "report.png"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    paths[1].write_text(report_markdown(report))
    fig, ax = plt.subplots(figsize=(6, 4))
    for s in report["stages"]:
        ax.scatter(s["file_bytes"] / 1024, 100 * s["test_accuracy"])
        ax.annotate(s["name"], (s["file_bytes"] / 1024, 100 * s["test_accuracy"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("file size (KiB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"jaxcompress demo: {report['dataset']}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths
