"""The demo's --parallel / --devices options."""
import json

import pytest

from jaxcompress import cli


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["pmap", "shard"])
def test_demo_runs_data_parallel_on_8_devices(tmp_path, parallel):
    rc = cli.main(["demo", "--dataset", "digits", "--out", str(tmp_path), "--train-subset", "256",
                   "--test-subset", "128", "--epochs", "1", "--no-progress", "--parallel", parallel,
                   "--devices", "8"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["parallel"] == parallel and report["config"]["devices"] == 8
    assert len(report["stages"]) == 4 and report["stages"][3]["sparsity"] >= 0.9


def test_demo_refuses_a_batch_that_does_not_split(tmp_path, capsys):
    rc = cli.main(["demo", "--dataset", "digits", "--out", str(tmp_path), "--no-progress",
                   "--parallel", "shard", "--devices", "3"])
    assert rc == 2
    assert "does not split evenly over 3 devices" in capsys.readouterr().err


def test_parser_defaults_keep_one_device():
    args = cli.build_parser().parse_args(["demo"])
    assert args.parallel == "none" and args.devices is None
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["demo", "--parallel", "dp"])
