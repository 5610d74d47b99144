"""How uneven the inputs of each block layer of a ``jaxcompress run oneshot_lm`` model are.

Wanda scores a weight by ``|W_ij| * ||X_j||``; it ranks weights differently from magnitude only
where the input norms ``||X_j||`` (over the calibration tokens) differ a lot between inputs, as in
LLMs with outlier features. ``python experiments/oneshot_input_norms.py RUN_DIR`` draws the run's
calibration windows (as its one-shot stages do), collects each block Dense layer's per-input sums
of squares on the dense model the one-shot stages start from, and writes ``RUN_DIR/input_norms.md``
and ``.json``: per layer, the largest norm and the 99th percentile over the median.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def norm_spread(sum_sq) -> dict:
    """``max / median`` and ``99th percentile / median`` of the input norms ``sqrt(sum_sq)``.

    Example:
      >>> norm_spread(np.array([1.0, 1.0, 4.0, 100.0]))  # norms 1, 1, 2, 10
      {'inputs': 4, 'max_over_median': 6.667, 'p99_over_median': 6.507}
    """
    norms = np.sqrt(np.asarray(sum_sq, np.float64))
    median = np.median(norms)
    return {"inputs": int(norms.size), "max_over_median": round(float(norms.max() / median), 3),
            "p99_over_median": round(float(np.quantile(norms, 0.99) / median), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="the output directory of `jaxcompress run oneshot_lm`")
    args = ap.parse_args(argv)
    from jaxcompress.oneshot.calibration import calibrate_layers
    from jaxcompress.train.state import linen_apply_fn
    from oneshot_qwix import load_run  # this script's neighbour in experiments/

    run = Path(args.run)
    loaded = load_run(run)
    row, oneshot = loaded.dense_row, loaded.oneshot
    stats = calibrate_layers(linen_apply_fn(loaded.model, inputs="tokens"), loaded.params, {}, loaded.calib,
                             rules=[(r"^block_\d+/.*/kernel$", True), (".*", None)], hessian=False)
    layers = {name: norm_spread(s.sum_sq) for name, s in stats.items()}
    (run / "input_norms.json").write_text(json.dumps({"model": row["name"], "calibration": oneshot["calibration"],
                                                      "layers": layers}, indent=2) + "\n")
    lines = [f"# Input norms of the block layers of '{row['name']}'", "",
             f"`python experiments/oneshot_input_norms.py DIR`: per-input norms ||X_j|| over the run's "
             f"{oneshot['calibration']} calibration windows, on the dense model its one-shot stages start from.", "",
             "| layer | inputs | max / median | 99th percentile / median |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {k} | {v['inputs']} | {v['max_over_median']:.2f} | {v['p99_over_median']:.2f} |" for k, v in layers.items()]
    (run / "input_norms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
