"""The ``jaxcompress`` command."""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence


def _request_host_devices(count: Optional[int]) -> None:
    """Asks XLA for ``count`` CPU devices (only read when JAX starts its CPU backend; no effect on GPU/TPU)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count and count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _demo(args: argparse.Namespace) -> int:
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
            "prune_epochs": args.epochs, "qat_epochs": args.epochs} if args.epochs else {}),
    )
    t0 = time.time()
    try:
        report = run_demo(config)
    except (DataNotFoundError, ValueError) as e:
        print(f"jaxcompress demo: {e}", file=sys.stderr)
        return 2
    report["total_seconds"] = round(time.time() - t0, 1)
    paths = write_report(report, args.out)
    print(report_markdown(report))
    print(f"total {report['total_seconds']} s; wrote " + ", ".join(str(p) for p in paths))
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
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--sparsity", type=float, default=0.9, help="final sparsity of the student (default: %(default)s)")
    demo.add_argument("--bits", type=int, default=8, help="weight bits of the final stage (default: %(default)s)")
    demo.add_argument("--epochs", type=float, default=None, help="epochs of every stage (default: per-stage settings)")
    demo.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    demo.add_argument("--test-subset", type=int, default=None, help="use only the first N test images")
    demo.add_argument("--parallel", default="none", choices=["none", "pmap", "shard"],
                      help="data parallelism: none (one device), pmap, or shard (jit over a 'data' mesh); "
                      "the batch of each step stays the global batch (default: %(default)s)")
    demo.add_argument("--devices", type=int, default=None,
                      help="devices for --parallel (default: all; on CPU, this many host devices are created)")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``jaxcompress`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
