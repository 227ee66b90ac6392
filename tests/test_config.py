"""Hyperparameters from the command line: --name=value sets any field with its type, --preset=smoke applies a
preset that later arguments override, and unknown names, bad values and malformed arguments give clear errors
(and a non-zero exit before anything starts). Every field but the switches has a rule, and a value that breaks it
is one error naming the field, the value and the rule; so is a --check count that is not positive, a --tag that
is not a plain name, and a log or checkpoint folder that can't be written. Also the lr and momentum schedules and
the line said before the warm-up."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from train_gpt import (FIELD_RULES, PRESETS, ConfigError, Hyperparameters, _convert, check_config, check_launch,
                       lr_factor, muon_momentum, parse_args, warm_up_note)

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
    (["--preset=huge"], "--preset=huge: must be one of: smoke"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("?", r"\?")):
        parse_args(argv)


def test_every_field_but_the_switches_has_a_rule():
    fields = {f.name for f in dataclasses.fields(Hyperparameters) if f.type is not bool}
    assert FIELD_RULES.keys() == fields
    parse_args([]), parse_args(["--preset=smoke"])  # the defaults and the preset keep the rules


POSITIVE, NON_NEGATIVE, LR = "a positive integer", "a non-negative integer", "a positive finite number"


@pytest.mark.parametrize("arg, error", [
    ("--num_iterations=-5", POSITIVE), ("--num_iterations=0", POSITIVE), ("--batch_seqs=0", POSITIVE),
    ("--val_tokens=0", POSITIVE), ("--num_heads=0", POSITIVE), ("--model_dim=-64", POSITIVE),
    ("--window_tokens=0", POSITIVE), ("--muon_momentum_steps=0", POSITIVE),
    ("--seq_len=0", "a positive multiple of the attention block size 128"),
    ("--seq_len=1000", "a positive multiple of the attention block size 128"),
    ("--num_layers=0", "a positive even integer"), ("--num_layers=3", "a positive even integer"),
    ("--vocab_size=1", "at least 2"),
    ("--cooldown_frac=0.0", "a fraction in (0, 1]"), ("--cooldown_frac=1.5", "a fraction in (0, 1]"),
    ("--checkpoint_every=-1", NON_NEGATIVE), ("--val_every=-1", NON_NEGATIVE), ("--warmup_steps=-1", NON_NEGATIVE),
    ("--profile_at=-1", NON_NEGATIVE),
    ("--muon_lr=0.0", LR), ("--head_lr=-0.1", LR), ("--embed_lr=inf", LR), ("--scalar_lr=nan", LR),
    ("--muon_momentum_start=-0.1", "in [0, 1)"), ("--muon_momentum_end=1.0", "in [0, 1)"),
    ("--seed=-1", "an integer in [0, 2**63)"),
    ("--train_files=", "non-empty"), ("--val_files=", "non-empty"), ("--checkpoint_dir=", "non-empty"),
    ("--tag=..", "a plain name"), ("--tag=.", "a plain name"), ("--tag=../x", "a plain name"),
    ("--tag=/abs", "a plain name"), ("--tag=a b", "a plain name"),
])
def test_a_value_that_breaks_its_rule_is_one_error(arg, error):
    """arg as the error repeats it (floats as Python prints them), and the start of the rule the error states."""
    with pytest.raises(ConfigError) as raised:
        parse_args(["--preset=smoke", arg])
    assert str(raised.value).startswith(f"{arg}: must be {error}") and ";" not in str(raised.value), raised.value


def test_plain_tags_are_taken():
    for tag in ("smoke", "2025-01-16_run.v2", "A1"):
        assert parse_args([f"--tag={tag}"]).tag == tag


@pytest.mark.parametrize("text, error", [
    ("0", "--check=0: must be a positive integer (the number of processes)"),
    ("-1", "--check=-1: must be a positive integer (the number of processes)"),
    ("x", "--check takes int values, not 'x'"),
])
def test_check_takes_a_positive_process_count(text, error):
    with pytest.raises(ConfigError) as raised:
        check_launch([], _convert("check", text, int))  # as the __main__ block reads --check=text
    assert str(raised.value) == error


def test_inconsistent_configuration():
    check_config(Hyperparameters(), world_size=8)
    with pytest.raises(ConfigError, match="can't be shared out evenly over 3 ranks"):
        check_config(Hyperparameters(), world_size=3)
    with pytest.raises(ConfigError, match="model_dim=36 must be a multiple of 4 x num_heads = 24"):
        check_config(parse_args(["--preset=smoke", "--model_dim=36", "--num_heads=6"]), world_size=1)


def test_folders_that_cant_be_written(tmp_path, monkeypatch):
    """A file in the way (chmod can't make a folder read-only to root, whom the tests may run as)."""
    monkeypatch.chdir(tmp_path)
    smoke = parse_args(["--preset=smoke"])
    check_config(smoke, world_size=2)
    assert not (tmp_path / "records").exists()  # checked, not made
    (tmp_path / "records").write_text("")
    with pytest.raises(ConfigError, match="^can't write the log into records/smoke: records is not a folder$"):
        check_config(smoke, world_size=2)
    (tmp_path / "records").unlink()
    (tmp_path / "ckpt").write_text("")
    check_config(parse_args(["--preset=smoke", "--checkpoint_dir=ckpt/run"]), world_size=2)  # checkpoints off
    with pytest.raises(ConfigError, match="^can't write checkpoints into ckpt/run: ckpt is not a folder$"):
        check_config(parse_args(["--preset=smoke", "--checkpoint_dir=ckpt/run", "--checkpoint_every=5"]), 2)


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


def test_the_warm_up_says_what_it_does():
    assert warm_up_note(Hyperparameters()).startswith("warming up: compiling the model and running 2 untimed steps "
                                                      "(a cold compile takes about 1 minute")
    assert warm_up_note(Hyperparameters(compile=False, warmup_steps=1)) == (
        "warming up: running 1 untimed step, without compiling (--compile=0)")
    assert "first timed steps compile" in warm_up_note(Hyperparameters(warmup_steps=0))


def test_help_lists_the_hyperparameters(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "torchrun --standalone" in result.stdout
    assert "num_iterations: int = 1393  # training steps" in result.stdout
