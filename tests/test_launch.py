"""The launch path users take, on the CPU: ./run.sh and torchrun with bad input or --help.
- A configuration or data error reaches the user once, as the first line of output and without a traceback from
  our code; ./run.sh exits with code 2 before torchrun starts; under a direct torchrun only rank 0 prints it.
- ./run.sh refuses an NPROC that is not a positive integer before anything runs, and a records/ it can't write
  into at its check, each with one line.
- The process-count message names the counts that work for the run's batch_seqs, and brings no second error.
- --help prints before torch is imported, and once, also through ./run.sh and torchrun.
- The smoke preset makes data only in its own folder, and only once, when the folder is missing: a command that
  needs more than it holds is refused and changes no file under data/; a user's shards get the error they get
  without the preset, and stay as they were.
Each test works in a copy of the scripts in a temporary folder: run.sh writes next to itself."""
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CPU_ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")


@pytest.fixture
def checkout(tmp_path) -> Path:
    for name in ("run.sh", "train_gpt.py", "data/synthetic.py", "data/cached_fineweb10B.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    return tmp_path


def output_of(command: list, cwd: Path, env: dict = CPU_ENV) -> tuple[int, list[str]]:
    """(exit code, the lines of stdout and stderr together)."""
    result = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300)
    return result.returncode, result.stdout.splitlines()


def write_shard(path: Path, tokens: int, count: int | None = None):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, tokens if count is None else count
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + np.arange(tokens, dtype="<u2").tobytes())


@pytest.mark.parametrize("args, env, error", [
    (["--num_iterations=abc"], {}, "error: --num_iterations takes int values, not 'abc'"),
    (["--num_iteration=5"], {}, "error: unknown hyperparameter --num_iteration (did you mean --num_iterations?)"),
    ([], {"NPROC": "3"}, "error: batch_seqs=2 sequences can't be shared out evenly over 3 ranks: use 1 or 2 "
                         "processes"),
    ([], {"NPROC": "0"}, "error: NPROC=0: must be a positive integer (the number of processes)"),
    ([], {"NPROC": "abc"}, "error: NPROC=abc: must be a positive integer (the number of processes)"),
])
def test_run_sh_errors_are_one_line_and_exit_2(checkout, args, env, error):
    code, lines = output_of(["./run.sh", *args], checkout, {**CPU_ENV, **env})
    assert (code, lines) == (2, [error])
    assert not (checkout / "records").exists()


def test_run_sh_records_it_cant_write_into(checkout):
    """A file named records (as root, which the tests may run as, chmod can't make a folder read-only)."""
    (checkout / "records").write_text("")
    code, lines = output_of(["./run.sh"], checkout)
    assert (code, lines) == (2, ["error: can't write the log into records/smoke: records is not a folder"])


def test_run_sh_bad_user_shard_with_the_smoke_preset(checkout):
    """The preset's data folder is its own: a user's folder gets the plain data error, and is left alone."""
    user = checkout / "mine"
    write_shard(user / "fineweb_train_000001.bin", 30_000)
    write_shard(user / "fineweb_train_000002.bin", 30_000, count=40_000)  # truncated
    write_shard(user / "fineweb_val_000000.bin", 30_000)
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    files = [f"--train_files={user}/fineweb_train_*.bin", f"--val_files={user}/fineweb_val_*.bin"]
    code, lines = output_of(["./run.sh", *files], checkout)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {user}/fineweb_train_000002.bin: holds 30,000 of the 40,000 tokens")
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    assert not list(checkout.glob("data/synthetic_smoke*"))


def test_the_smoke_folder_is_made_once_and_a_refused_command_changes_nothing(checkout):
    check = [sys.executable, "train_gpt.py", "--check=2", "--preset=smoke"]
    code, lines = output_of(check, checkout)  # missing: made
    (folder,) = checkout.glob("data/synthetic_smoke*")
    assert code == 0 and lines == [f"smoke data: made by data/synthetic.py into data/{folder.name}"], lines
    md5 = {p: hashlib.md5(p.read_bytes()).hexdigest() for p in checkout.glob("data/**/*") if p.is_file()}
    code, lines = output_of([*check, "--num_iterations=100000"], checkout)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: the 5 shards matching data/{folder.name}/fineweb_train_*.bin feed 1486 steps")
    assert lines[0].endswith("num_iterations=100000: the smoke preset's data is fixed: lower --num_iterations, "
                             "--batch_seqs or --val_tokens, or train on other shards (--train_files, --val_files)")
    assert output_of(check, checkout) == (0, [])  # there and intact: used as it is
    assert {p: hashlib.md5(p.read_bytes()).hexdigest() for p in checkout.glob("data/**/*") if p.is_file()} == md5


def test_torchrun_prints_an_error_once_first(checkout):
    env = {**CPU_ENV, "OMP_NUM_THREADS": "1"}  # else torchrun prints a notice first
    code, lines = output_of([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train_gpt.py", "--preset=smoke", "--num_iterations=abc"], checkout, env)
    assert code != 0
    assert lines[0] == "error: --num_iterations takes int values, not 'abc'"
    assert sum("--num_iterations takes int values" in line for line in lines) == 1
    assert not any(line.startswith('  File "') and "train_gpt.py" in line for line in lines)  # our traceback


def test_help_prints_before_torch_is_imported_and_once(checkout):
    fake = checkout / "no_torch"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch imported')\n")
    code, lines = output_of([sys.executable, "train_gpt.py", "--help"], checkout,
                            {**CPU_ENV, "PYTHONPATH": str(fake)})
    assert code == 0 and "    num_iterations: int = 1393  # training steps" in lines
    for command in (["./run.sh", "--help"], [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", "train_gpt.py", "--help"]):
        code, lines = output_of(command, checkout, {**CPU_ENV, "OMP_NUM_THREADS": "1"})
        assert code == 0 and sum(line.startswith("Hyperparameters (--name=value)") for line in lines) == 1, lines
