"""How a run stops, on the CPU: in one line from rank 0, without a traceback from the trainer, with what it saved
intact and no worker left behind.
- A checkpoint holds a checksum of its content: a byte flipped in a tensor's data is refused in one line that names
  the file and lists the checkpoints beside it.
- A checkpoint that can't be written (a full disk) leaves no .tmp file and says which path and why.
- A collective that timed out on gloo is one line on stderr and exit code 1; an exception that is a bug keeps its
  traceback.
- A non-finite loss stops every rank together, after rank 0 has written its checkpoint and line, also when that write
  is slow (other ranks that left first had torchrun kill rank 0 mid-write); the line says there is no earlier
  checkpoint to resume from.
- SIGINT to torchrun: rank 0 prints `interrupted at step N; last checkpoint: <path>`, the workers no traceback;
  torchrun itself still prints its SignalException traceback and exits 1. SIGTERM to a plain `python train_gpt.py`:
  the line and exit code 143.
- torchrun killed by SIGKILL: its workers stop within seconds (prctl's parent-death signal, SIGTERM) and say so."""
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt

REPO = Path(__file__).resolve().parent.parent
CPU_ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
INTERRUPTED = re.compile(r"^interrupted at step (\d+); last checkpoint: (\S+)$", re.M)


@pytest.fixture(scope="module")
def long_data(tmp_path_factory) -> tuple[str, ...]:
    """Arguments for a smoke run of 100 steps, on random tokens: a run that a signal, not its end, stops."""
    folder = tmp_path_factory.mktemp("long_data")
    tokens = np.random.default_rng(0).integers(0, 1024, 3 * 120_000, dtype="<u2")
    for name, part in zip(["train_000001", "train_000002", "val_000000"], np.split(tokens, 3)):
        header = np.zeros(train_gpt.HEADER_INTS, dtype="<i4")
        header[:3] = train_gpt.SHARD_MAGIC, train_gpt.SHARD_VERSION, len(part)
        (folder / f"fineweb_{name}.bin").write_bytes(header.tobytes() + part.tobytes())
    return f"--train_files={folder}/fineweb_train_*.bin", f"--val_files={folder}/fineweb_val_*.bin", \
        "--num_iterations=100"


def saved_state(tmp_path: Path, *names: str) -> list[Path]:
    """The smoke preset's initial state saved under each name, in one folder, by one process."""
    args = train_gpt.parse_args(["--preset=smoke"])
    model = train_gpt.build_model(args, torch.device("cpu"))
    adam, muon = train_gpt.build_optimizers(model, args, rank=0, world_size=1)
    loader = SimpleNamespace(state=lambda: dict(shard=0, pos=0), fingerprint=[])
    paths = [tmp_path / "checkpoints" / name for name in names]
    for step, path in enumerate(paths, start=1):
        train_gpt.save_checkpoint(path, args, step, 0.0, model, adam, muon, loader, rank=0)
    return paths


def test_a_flipped_byte_in_a_tensor_is_refused(tmp_path):
    good, damaged = saved_state(tmp_path, "step_000001.pt", "step_000002.pt")
    embed = train_gpt.load_checkpoint(str(good), train_gpt.parse_args(["--preset=smoke"]))["model"]["embed.weight"]
    content = bytearray(damaged.read_bytes())
    start = content.find(embed.reshape(-1).view(torch.uint8).numpy().tobytes()[:64])  # stored as is in the zip
    assert start > 0
    content[start + 1000:start + 1100] = bytes(b ^ 0xFF for b in content[start + 1000:start + 1100])
    damaged.write_bytes(content)
    with pytest.raises(train_gpt.ConfigError) as refused:
        train_gpt.load_checkpoint(str(damaged), train_gpt.parse_args(["--preset=smoke"]))
    (line,) = str(refused.value).splitlines()
    assert f"{damaged} is damaged (its content fails its checksum)" in line
    assert line.endswith("checkpoints beside it: step_000001.pt, step_000002.pt"), line


def full_disk_oserror(state, f):
    f.write(b"x" * 1000)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_as_torch_says(state, f):
    """torch's zip writer: the OSError from the file, then "unexpected pos" as it closes the archive."""
    try:
        full_disk_oserror(state, f)
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")


@pytest.mark.parametrize("save", [full_disk_oserror, full_disk_as_torch_says])
def test_a_save_that_fails_leaves_no_tmp_and_names_the_path(tmp_path, monkeypatch, save):
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(train_gpt.RunError) as failed:
        saved_state(tmp_path, "step_000001.pt")
    path = tmp_path / "checkpoints" / "step_000001.pt"
    assert str(failed.value) == f"could not write checkpoint {path}: No space left on device"
    assert list(path.parent.iterdir()) == []


def test_a_timed_out_collective_is_one_line(capsys):
    stops = train_gpt.Stops(rank=0)
    stops.step, stops.checkpoint = 7, Path("checkpoints/run/step_000006.pt")
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                        "5000ms for recv operation to complete")
    assert stops.exit_code(gloo) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == (
        "error: rank 0 waited longer than --collective_timeout for the others in a collective (Timed out waiting "
        "5000ms for recv operation to complete): one of them stopped or hangs; the run stops at step 7; last "
        "checkpoint: checkpoints/run/step_000006.pt\n")
    assert stops.exit_code(ValueError("a bug")) is None


SLOW_SAVE = """import atexit, os, runpy, sys, time
import torch
save = torch.save
def slow_save(*args, **kwargs):  # rank 0's checkpoint takes seconds to write
    time.sleep(2)
    save(*args, **kwargs)
    open("saved_at", "w").write(str(time.time()))
torch.save = slow_save
atexit.register(lambda: open(f"rank_{{os.environ['RANK']}}_exited_at", "w").write(str(time.time())))
sys.argv[0] = {train_gpt!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def torchrun_command(script: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
            "--preset=smoke", *args]


def test_a_nonfinite_loss_stops_every_rank_once_rank_0_has_saved(tmp_path, long_data):
    driver = tmp_path / "slow_save.py"
    driver.write_text(SLOW_SAVE.format(train_gpt=str(REPO / "train_gpt.py")))
    command = torchrun_command(driver, *long_data, "--head_lr=1e30", "--embed_lr=1e30", "--checkpoint_every=100")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=CPU_ENV)
    assert result.returncode == 1
    match = re.search(r"^step (\d+): the train loss is (nan|inf); stopping \(state after the step saved to (\S+)\); "
                      r"there is no earlier checkpoint to resume from$", result.stdout, re.M)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert Path(tmp_path / match[3]).name == f"step_{int(match[1]):06d}_nonfinite.pt"
    assert (tmp_path / match[3]).is_file() and not list(tmp_path.glob("checkpoints/*/*.tmp"))
    assert "interrupted" not in result.stdout  # torchrun may end a rank slower to exit: it says nothing
    assert float((tmp_path / "rank_1_exited_at").read_text()) > float((tmp_path / "saved_at").read_text())


def wait_for_line(process: subprocess.Popen, pattern: str) -> list[str]:
    """The lines of stdout up to the first that matches."""
    lines = []
    while not lines or not re.match(pattern, lines[-1]):
        line = process.stdout.readline()
        assert line, "".join(lines[-20:]) + process.stderr.read()[-3000:]
        lines.append(line)
    return lines


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(command, cwd=cwd, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigint_to_torchrun_stops_in_one_line(tmp_path, long_data):
    process = start(torchrun_command(REPO / "train_gpt.py", *long_data, "--checkpoint_every=1"), tmp_path)
    first = wait_for_line(process, r"checkpoint: \S+step_000002.pt$")
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    out = "".join(first) + out
    assert process.returncode == 1, err[-4000:]  # torchrun's own code, after its SignalException
    (match,) = INTERRUPTED.finditer(out)
    assert int(match[1]) >= 2 and match[2].endswith(f"step_{int(match[1]):06d}.pt")
    assert (tmp_path / match[2]).is_file() and not list(tmp_path.glob("checkpoints/*/*.tmp"))
    # the workers printed no traceback; torchrun printed its one
    assert "[rank" not in err and "KeyboardInterrupt" not in out + err and err.count("Traceback") == 1, err
    assert "SignalException: Process" in err
    log = tmp_path / re.search(r"^log: (\S+)$", out, re.M)[1]
    assert log.read_text().splitlines()[-1] == match[0]


def test_sigterm_to_python_stops_in_one_line_with_143(tmp_path, long_data):
    process = start([sys.executable, str(REPO / "train_gpt.py"), "--preset=smoke", *long_data], tmp_path)
    wait_for_line(process, r"step:2/")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143 and err == ""
    assert re.search(r"interrupted at step \d+; last checkpoint: none\n\Z", out), out[-1000:]


def test_workers_stop_when_torchrun_is_killed(tmp_path, long_data):
    process = start(torchrun_command(REPO / "train_gpt.py", *long_data), tmp_path)
    workers = []
    try:
        wait_for_line(process, r"step:2/")
        workers = [int(pid) for pid in Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()]
        assert len(workers) == 2
        process.kill()
        killed = time.monotonic()
        out, _ = process.communicate(timeout=30)  # the end of stdout: the workers, which hold it too, are gone
        assert time.monotonic() - killed < 10
        assert INTERRUPTED.search(out), out[-1000:]
    finally:
        for pid in workers:  # any the test left: this run's, by their id
            try:
                if "train_gpt.py" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
