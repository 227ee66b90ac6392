"""Hyperparameters from the command line: --name=value sets any field with its type, --preset=smoke applies a
preset that later arguments override, and unknown names, bad values and malformed arguments give clear errors
(and a non-zero exit before anything starts). Also the lr and momentum schedules."""
import subprocess
import sys
from pathlib import Path

import pytest

from train_gpt import PRESETS, ConfigError, Hyperparameters, check_config, lr_factor, muon_momentum, parse_args

REPO = Path(__file__).resolve().parent.parent


def test_defaults_are_the_record():
    args = parse_args([])
    assert args == Hyperparameters()
    assert (args.num_iterations, args.batch_seqs * args.seq_len, args.val_tokens) == (1393, 524_288, 10_485_760)


def test_typed_overrides():
    args = parse_args(["--num_iterations=100", "--muon_lr=0.02", "--fp8_head=0", "--tag=sweep", "--seq_len=1_024"])
    assert (args.num_iterations, args.muon_lr, args.fp8_head, args.tag, args.seq_len) == (100, 0.02, False, "sweep",
                                                                                            1024)
    assert parse_args(["--compile=true"]).compile is True


def test_preset_then_overrides():
    args = parse_args(["--preset=smoke", "--num_iterations=7"])
    assert args.num_iterations == 7 and args.model_dim == PRESETS["smoke"]["model_dim"]
    assert parse_args(["--num_iterations=7", "--preset=smoke"]).num_iterations == 7  # order does not matter


@pytest.mark.parametrize("argv, message", [
    (["--num_iteration=5"], "did you mean --num_iterations"),
    (["--frobnicate=5"], "unknown hyperparameter --frobnicate"),
    (["--num_iterations=many"], "--num_iterations takes int values, not 'many'"),
    (["--muon_lr=fast"], "--muon_lr takes float values"),
    (["--compile=maybe"], "--compile takes a boolean"),
    (["--num_iterations"], "arguments are --name=value"),
    (["num_iterations=5"], "arguments are --name=value"),
    (["--preset=huge"], "unknown preset 'huge'"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_args(argv)


def test_inconsistent_configuration():
    check_config(Hyperparameters(), world_size=8)
    with pytest.raises(ConfigError, match="can't be shared out evenly over 3 ranks"):
        check_config(Hyperparameters(), world_size=3)
    with pytest.raises(ConfigError, match="multiple of the attention block size"):
        check_config(Hyperparameters(seq_len=1000), world_size=1)


def test_command_line_error_exits_before_training(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--num_iteratons=5"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: unknown hyperparameter --num_iteratons (did you mean --num_iterations?)" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "records").exists()


def test_schedules():
    args = Hyperparameters()
    assert lr_factor(0, args) == 1.0 and lr_factor(int(0.6 * 1393), args) == 1.0
    assert lr_factor(1393, args) == pytest.approx(0.1) and lr_factor(1100, args) < 1.0
    assert muon_momentum(0, args) == 0.85 and muon_momentum(150, args) == pytest.approx(0.90)
    assert muon_momentum(300, args) == muon_momentum(1000, args) == 0.95


def test_help_lists_the_hyperparameters(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "torchrun --standalone" in result.stdout
    assert "num_iterations: int = 1393  # training steps" in result.stdout
