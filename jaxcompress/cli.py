"""The ``jaxcompress`` command."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional, Sequence


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r} (e.g. 0.5 for half an epoch)")
    return value


def _sparsity(text: str) -> float:
    value = _finite(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r} (e.g. 0.9 for 90%% of the weights zero)")
    return value


def _int_at_least(low: int, high: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return value

    return parse


def _check_out(out: str) -> Optional[str]:
    """Why ``out`` cannot be the output directory, or ``None`` when it can."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        return f"--out {out!r} is a file, not a directory; give a directory path."
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        return f"--out {out!r} cannot be created: {parent!r} is not a writable directory."
    return None


def _request_host_devices(count: Optional[int]) -> None:
    """Asks XLA for ``count`` CPU devices (only read when JAX starts its CPU backend; no effect on GPU/TPU)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count and count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _demo(args: argparse.Namespace) -> int:
    problem = _check_out(args.out)
    if problem is not None:  # before any training, not after minutes of it
        print(f"jaxcompress demo: {problem}", file=sys.stderr)
        return 2
    if args.parallel != "none":
        _request_host_devices(args.devices)
    from jaxcompress.data import DataNotFoundError
    from jaxcompress.recipes.demo import DemoConfig, run_demo
    from jaxcompress.recipes.report import report_markdown, write_report

    config = DemoConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        seed=args.seed,
        sparsity=args.sparsity,
        bits=args.bits,
        progress=not args.no_progress,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        parallel=args.parallel,
        devices=args.devices,
        **({"teacher_epochs": args.epochs, "student_epochs": args.epochs,
            "prune_epochs": args.epochs, "qat_epochs": args.epochs} if args.epochs is not None else {}),
    )
    t0 = time.time()
    try:
        report = run_demo(config, artifact_dir=args.out)
    except (DataNotFoundError, ValueError) as e:
        print(f"jaxcompress demo: {e}", file=sys.stderr)
        return 2
    report["total_seconds"] = round(time.time() - t0, 1)
    paths = write_report(report, args.out)
    print(report_markdown(report))
    print(f"total {report['total_seconds']} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


def _run(args: argparse.Namespace) -> int:
    from jaxcompress.recipes.schema import RecipeError, load_recipe

    try:  # every check that needs no data or training, in well under a second
        recipe = load_recipe(args.recipe)
    except (RecipeError, FileNotFoundError) as e:
        print(f"jaxcompress run: {e}", file=sys.stderr)
        return 2
    if args.data_dir is not None:
        recipe["data"]["dir"] = args.data_dir
    out = args.out or f"jaxcompress_{recipe['name']}"
    problem = _check_out(out)
    if problem is not None:
        print(f"jaxcompress run: {problem}", file=sys.stderr)
        return 2
    if recipe["parallel"] != "none":
        _request_host_devices(recipe.get("devices"))
    from jaxcompress.data import DataNotFoundError
    from jaxcompress.recipes.report import report_markdown, write_report
    from jaxcompress.recipes.runner import run_recipe, smoke_recipe

    if args.smoke:
        recipe = smoke_recipe(recipe)
    try:
        report = run_recipe(recipe, out, progress=not args.no_progress)
    except (DataNotFoundError, ValueError) as e:
        print(f"jaxcompress run: {e}", file=sys.stderr)
        return 2
    paths = write_report(report, out)
    print(report_markdown(report))
    print(f"total {report['total_seconds']} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


def _report(args: argparse.Namespace) -> int:
    problem = _check_out(args.out)
    if problem is not None:
        print(f"jaxcompress report: {problem}", file=sys.stderr)
        return 2
    from jaxcompress.recipes.compare import compare_markdown, compare_runs, read_reports

    try:
        paths = compare_runs(args.dirs, args.out)
    except ValueError as e:
        print(f"jaxcompress report: {e}", file=sys.stderr)
        return 2
    print(compare_markdown(read_reports(args.dirs)))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``jaxcompress`` command."""
    parser = argparse.ArgumentParser(prog="jaxcompress", description="Prune, quantize and distill JAX models.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="teacher -> distilled student -> 90%% pruned -> int8 QAT on MNIST, with a report",
        description="Trains a teacher CNN, distills a smaller student, prunes it gradually to the target "
        "sparsity, runs int8 quantization-aware training, and writes OUT/report.{json,md,png}. "
        "Without --data-dir or JAXCOMPRESS_DATA_DIR and offline, it uses scikit-learn's bundled "
        "digits and says so.",
    )
    demo.add_argument("--data-dir", default=None, help="directory with the MNIST/Fashion-MNIST IDX files "
                      "(default: $JAXCOMPRESS_DATA_DIR, then ~/.cache/jaxcompress/<dataset>, downloading if missing)")
    demo.add_argument("--dataset", default="mnist", choices=["mnist", "fashion_mnist", "digits"])
    demo.add_argument("--out", default="jaxcompress_demo", help="output directory (default: %(default)s)")
    demo.add_argument("--seed", type=_int_at_least(0), default=0)
    demo.add_argument("--sparsity", type=_sparsity, default=0.9,
                      help="final sparsity of the student, in [0, 1) (default: %(default)s)")
    demo.add_argument("--bits", type=_int_at_least(2, 8), default=8,
                      help="weight bits of the final stage, 2..8 (default: %(default)s)")
    demo.add_argument("--epochs", type=_positive_float, default=None,
                      help="epochs of every stage, > 0 (default: per-stage settings)")
    demo.add_argument("--train-subset", type=_int_at_least(1), default=None, help="use only the first N training images")
    demo.add_argument("--test-subset", type=_int_at_least(1), default=None, help="use only the first N test images")
    demo.add_argument("--parallel", default="none", choices=["none", "pmap", "shard"],
                      help="data parallelism: none (one device), pmap, or shard (jit over a 'data' mesh); "
                      "the batch of each step stays the global batch (default: %(default)s)")
    demo.add_argument("--devices", type=_int_at_least(1), default=None,
                      help="devices for --parallel (default: all; on CPU, this many host devices are created)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)

    run = sub.add_parser(
        "run",
        help="run a recipe (a TOML file, or the name of a shipped recipe such as 'demo')",
        description="Validates the recipe (unknown keys, bad values and rules that match no parameter fail at "
        "once, naming the key and line), then runs its stages for each seed, checkpointing each stage under "
        "OUT/seed_S/stage_NAME/ (a re-run resumes), and writes OUT/report.{json,md,png} and OUT/runs.jsonl.",
    )
    run.add_argument("recipe", help="path of a .toml recipe, or a shipped recipe's name")
    run.add_argument("--out", default=None, help="output directory (default: jaxcompress_<recipe name>)")
    run.add_argument("--data-dir", default=None, help="the data set's directory (overrides the recipe's data.dir; for "
                     "python_corpus, a directory of .py files to read instead of the standard library)")
    run.add_argument("--smoke", action="store_true",
                     help="a few seconds' check: first seed, a few hundred images, at most one epoch a stage")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.set_defaults(func=_run)

    report = sub.add_parser(
        "report",
        help="compare runs side by side (table and accuracy-vs-file-bytes Pareto plot)",
        description="Reads DIR/report.json of each run and writes OUT/compare.md and OUT/compare.png.",
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="output directories of `jaxcompress run`")
    report.add_argument("--out", default="jaxcompress_compare", help="output directory (default: %(default)s)")
    report.set_defaults(func=_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``jaxcompress`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
