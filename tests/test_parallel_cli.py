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
    # 90% overall up to rounding: each layer removes round(s * n) of its n weights
    assert len(report["stages"]) == 4 and report["stages"][3]["sparsity"] == pytest.approx(0.9, abs=1e-4)


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


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs: must be > 0"),
    (["--epochs", "nan"], "--epochs: expected a finite number"),
    (["--epochs", "inf"], "--epochs: expected a finite number"),
    (["--train-subset", "0"], "--train-subset: must be >= 1"),
    (["--train-subset", "-5"], "--train-subset: must be >= 1"),
    (["--sparsity", "1.5"], "--sparsity: must be in [0, 1)"),
    (["--bits", "9"], "--bits: must be between 2 and 8"),
    (["--devices", "0"], "--devices: must be >= 1"),
])
def test_bad_demo_values_fail_before_training(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--no-progress"] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_out_that_is_a_file_fails_before_training(tmp_path, capsys):
    target = tmp_path / "report.txt"
    target.write_text("x")
    assert cli.main(["demo", "--dataset", "digits", "--out", str(target), "--no-progress"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
