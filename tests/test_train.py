"""End to end on the CPU with the smoke preset, under torchrun on gloo:
- the run trains (the loss falls), says what its warm-up does before it, and its log parses, also for
  tools/summarize.py; --profile_at writes a profile that tools/profile_summary.py reads;
- on 1 and 2 ranks it prints the losses pinned in SMOKE_LOSSES, within CPU_ROUNDING;
- 1 process accumulating 2 sequences ends with the same weights as 2 processes with 1 each; one rank in a process
  group sends no collective in a step; the warm-up's precompiling thread runs copies of the model's blocks;
- 8 processes, the main command's count, print 1 process's losses (batch_seqs=8);
- a resumed run repeats the uninterrupted run's losses bit for bit, also on another world size, and a
  checkpoint of another configuration, or on other data (a train shard replaced by another), is refused; a
  folder resumes from its newest checkpoint, and the run keeps the checkpoint's interval; a damaged checkpoint
  gets one line that lists the ones beside it;
- 2 nodes x 1 process (two launchers on loopback) give the losses of 1 node x 2 processes.
How a run stops early (a non-finite loss, a signal) is test_stops.py's."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_gpt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import profile_summary  # noqa: E402
import summarize  # noqa: E402

# The CPU path on gloo, also on a GPU machine; one thread a process, as torchrun sets for several: CPU sums
# then add up in the same order for any nproc.
CPU_ENV = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
STEP_LINE = re.compile(r"^step:(\d+)/(\d+) (val_loss|train_loss):(\S+) train_time:(\d+)ms step_avg:(\S+)ms$")
# What the smoke preset prints, on 1 and 2 ranks alike: (step, kind) -> loss. A change that keeps the math keeps
# these; one that changes it updates them, and says why. CPUs round differently by their vector units (an AVX2-only
# CPU prints losses a few 1e-4 away, growing with the steps), hence the tolerance.
CPU_ROUNDING = 1e-3
SMOKE_LOSSES = {(0, "val_loss"): 6.9315, (10, "val_loss"): 4.6977, (20, "val_loss"): 3.8282} | {
    (step, "train_loss"): loss for step, loss in enumerate(
        [6.9315, 6.7458, 6.4905, 6.2244, 6.0305, 5.7697, 5.4916, 5.2835, 5.1200, 4.9014, 4.6462, 4.5786, 4.4546,
         4.2690, 4.1069, 4.0604, 4.0860, 3.9385, 3.8114, 3.7942], start=1)}


@pytest.fixture(scope="session")
def smoke_data(tmp_path_factory) -> tuple[str, str]:
    """--train_files and --val_files of the smoke preset's shards, made once."""
    folder = tmp_path_factory.mktemp("smoke_data") / "shards"
    train_gpt.make_smoke_data(folder)
    return f"--train_files={folder}/fineweb_train_*.bin", f"--val_files={folder}/fineweb_val_*.bin"


def torchrun(cwd: Path, *args: str, nproc: int = 2, launcher: tuple = ("--standalone",), check: bool = True,
             timeout: int = 300) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc_per_node={nproc}",
               str(REPO / "train_gpt.py"), "--preset=smoke", *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=CPU_ENV)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def log_of(result: subprocess.CompletedProcess, cwd: Path) -> Path:
    return cwd / re.search(r"^log: (\S+)$", result.stdout, re.M).group(1)


def step_lines(log: Path) -> dict[tuple[int, str], float]:
    """{(step, "val_loss" or "train_loss"): loss} of a log."""
    lines = [STEP_LINE.match(line) for line in log.read_text().splitlines()]
    return {(int(m[1]), m[3]): float(m[4]) for m in lines if m}


def assert_pinned(losses: dict[tuple[int, str], float]):
    assert losses.keys() == SMOKE_LOSSES.keys()
    off = {key: round(loss - SMOKE_LOSSES[key], 4) for key, loss in losses.items()}
    assert max(map(abs, off.values())) <= CPU_ROUNDING, f"losses minus the pinned ones: {off}"


def final_model(run_dir: Path) -> dict:
    (checkpoint,) = sorted(run_dir.glob("checkpoints/*/step_*.pt"))
    return torch.load(checkpoint, weights_only=False)["model"]


def test_smoke_run_trains(tmp_path):
    result = torchrun(tmp_path, "--profile_at=5")
    log = log_of(result, tmp_path)
    assert log.parent.name == "smoke" and log.read_text().startswith('"""GPT-2 small')  # opens with the code
    text = log.read_text()
    assert "PyTorch" in text and "num_iterations = 20" in text and "fp8_head: off" in text
    assert "\nwarming up: running 1 untimed step, without compiling (--compile=0)\nwarmup_time:" in text
    losses = step_lines(log)
    assert_pinned(losses)
    assert [s for s, kind in losses if kind == "train_loss"] == list(range(1, 21))
    assert [s for s, kind in losses if kind == "val_loss"] == [0, 10, 20]
    assert losses[20, "val_loss"] < losses[0, "val_loss"] - 1.0, losses
    run = summarize.parse_log(log)  # the evidence tool reads what the trainer writes
    assert run.complete and run.final_val_loss == losses[20, "val_loss"], run.error
    # --profile_at=5 profiled steps 6..8 (on the CPU: CPU times only) and the profile tool reads them
    assert "profile of steps 6..8: " in text
    assert "forward_backward" in log.with_suffix(".profile.tsv").read_text()
    assert profile_summary.summary(log).startswith("measured step (profiled): ")


def test_one_rank_prints_the_pinned_losses(tmp_path, smoke_data):
    assert_pinned(step_lines(log_of(torchrun(tmp_path, *smoke_data, nproc=1), tmp_path)))


def test_one_rank_in_a_process_group_averages_nothing(monkeypatch, free_port):
    # torchrun --nproc_per_node=1 makes a process group of one rank: a collective there would only copy (NCCL's
    # one-rank all-reduce still runs a kernel a tensor), so train_step sends none
    def refuse(*args, **kwargs):
        raise AssertionError("a collective on one rank")

    args = train_gpt.Hyperparameters(**train_gpt.PRESETS["smoke"])
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    try:
        model = train_gpt.build_model(args, torch.device("cpu"))
        adam, muon = train_gpt.build_optimizers(model, args, rank=0, world_size=1)
        monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
        monkeypatch.setattr(train_gpt, "reduce_scatter", refuse)  # train_gpt's names for these two collectives
        monkeypatch.setattr(train_gpt, "all_gather", refuse)
        tokens = torch.randint(0, args.vocab_size, (args.batch_seqs * args.seq_len + 1,))
        window = train_gpt.window_tensor(0, args, torch.device("cpu"))
        loss = train_gpt.train_step(model, tokens[:-1], tokens[1:], window, args.seq_len, adam, muon)
        assert torch.isfinite(loss)
    finally:
        torch.distributed.destroy_process_group()


def test_the_warm_up_precompiles_on_copies_of_each_kind_of_block():
    # warm_up's thread runs one block of each kind forward and back, so that our GPU kernels compile beside
    # torch.compile; it runs copies, and the model it copied from is untouched
    model = train_gpt.GPT(vocab_size=1024, num_layers=12, num_heads=2, model_dim=64, max_seq_len=1024)
    kinds = train_gpt.block_kinds(model)
    assert [(block.attn is not None, takes_ve) for block, takes_ve in kinds] == [(True, True), (True, False),
                                                                                 (False, False)]
    assert not {id(p) for block, _ in kinds for p in block.parameters()} & {id(p) for p in model.parameters()}
    before = {name: t.clone() for name, t in model.state_dict().items()}
    args = train_gpt.Hyperparameters(**train_gpt.PRESETS["smoke"])
    train_gpt.precompile_kernels(kinds, args, torch.device("cpu"))
    assert all(p.grad is not None for block, _ in kinds for p in block.parameters())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_world_size_invariance(tmp_path, smoke_data):
    """batch_seqs=2: one rank accumulating both sequences vs two ranks with one each."""
    args = (*smoke_data, "--num_iterations=3", "--checkpoint_every=100")
    torchrun(tmp_path / "one", *args, nproc=1)
    torchrun(tmp_path / "two", *args, nproc=2)
    one, two = final_model(tmp_path / "one"), final_model(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=0, atol=0, msg=name)
    assert not torch.equal(one["lm_head.weight"], torch.zeros_like(one["lm_head.weight"]))


def test_eight_ranks_print_the_losses_of_one(tmp_path, smoke_data):
    args = (*smoke_data, "--batch_seqs=8", "--val_tokens=8192", "--num_iterations=3", "--val_every=1")
    one = step_lines(log_of(torchrun(tmp_path / "one", *args, nproc=1), tmp_path / "one"))
    eight = step_lines(log_of(torchrun(tmp_path / "eight", *args, nproc=8), tmp_path / "eight"))
    assert one.keys() == eight.keys() and len(one) == 7
    for key, loss in one.items():  # gloo sums 8 gradients in its own order: at most a last printed digit apart
        assert eight[key] == pytest.approx(loss, abs=1.01e-4), key


def test_resume_repeats_the_run_exactly(tmp_path, smoke_data):
    data = tmp_path / "data"  # a copy of its own, to replace a shard in at the end
    shutil.copytree(Path(smoke_data[0].partition("=")[2]).parent, data)
    args = (f"--train_files={data}/fineweb_train_*.bin", f"--val_files={data}/fineweb_val_*.bin",
            "--num_iterations=8", "--val_every=2", "--checkpoint_every=4")
    full = step_lines(log_of(torchrun(tmp_path, *args), tmp_path))
    checkpoint = sorted(tmp_path.glob("checkpoints/*/step_000004.pt"))[0]
    resumed_run = torchrun(tmp_path, *args, f"--resume={checkpoint}")
    assert f"resumed from {checkpoint} at step 4" in resumed_run.stdout
    resumed = step_lines(log_of(resumed_run, tmp_path))
    assert min(step for step, _ in resumed) == 4 and len(resumed) == 7  # val 4, 6, 8 and train 5..8
    for key, loss in resumed.items():
        assert full[key] == loss, key  # the printed losses, bit for bit to 4 decimals

    # a checkpoint holds every rank's Muon momentum, so it resumes on another world size too
    one_rank = step_lines(log_of(torchrun(tmp_path, *args, f"--resume={checkpoint}", nproc=1), tmp_path))
    assert one_rank == resumed

    refused = torchrun(tmp_path, *args, "--model_dim=32", f"--resume={checkpoint}", check=False)
    assert refused.returncode != 0
    assert "was made with other hyperparameters" in refused.stderr
    assert "model_dim: checkpoint 64, now 32" in refused.stderr

    # 8 steps read shard 1 only: a shard 2 copied over it is another valid shard of the same size
    shutil.copy(data / "fineweb_train_000002.bin", data / "fineweb_train_000001.bin")
    refused = torchrun(tmp_path, *args, f"--resume={checkpoint}", check=False)
    assert refused.returncode != 0
    assert [line for line in refused.stderr.splitlines() if "trained on other data" in line] == [
        f"error: --resume={checkpoint} trained on other data: {data}/fineweb_train_000001.bin: other content "
        f"(same size, another sha256); resume it on its own data"]


def test_two_nodes_on_loopback_match_one_node(tmp_path, free_port, smoke_data):
    args = (*smoke_data, "--num_iterations=4", "--val_every=2")
    single = step_lines(log_of(torchrun(tmp_path / "single", *args), tmp_path / "single"))
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={free_port}", None, str(REPO / "train_gpt.py"),
               "--preset=smoke", *args]
    nodes = [subprocess.Popen([c if c else f"--node_rank={rank}" for c in command], cwd=node_dir, env=CPU_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    log = node_dir / re.search(r"^log: (\S+)$", outputs[0][0], re.M).group(1)
    assert step_lines(log) == single


def test_resume_from_a_folder_keeps_the_interval_and_refuses_damaged_files(tmp_path, smoke_data):
    torchrun(tmp_path, *smoke_data, "--num_iterations=6", "--checkpoint_every=2")
    (folder,) = (tmp_path / "checkpoints").iterdir()
    (folder / "step_000006.pt").unlink()
    resumed = torchrun(tmp_path, *smoke_data, "--num_iterations=6", f"--resume={folder}")  # no --checkpoint_every
    assert f"resumed from {folder / 'step_000004.pt'} at step 4" in resumed.stdout
    assert "checkpoints: every 2 steps" in resumed.stdout
    assert len(list(tmp_path.glob("checkpoints/*/step_000006.pt"))) == 1  # in the resumed run's own folder

    good = (folder / "step_000004.pt").read_bytes()
    for name, content in [("truncated.pt", good[:len(good) // 2]), ("short.pt", good[:100]), ("text.pt", b"hi\n")]:
        (folder / name).write_bytes(content)
        check = [sys.executable, str(REPO / "train_gpt.py"), "--check=2", "--preset=smoke", *smoke_data,
                 "--num_iterations=6", f"--resume={folder / name}"]
        result = subprocess.run(check, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=CPU_ENV)
        assert result.returncode == 2 and result.stdout == "", result.stderr
        (line,) = result.stderr.splitlines()
        assert f"{folder / name} is not a readable checkpoint" in line
        assert line.endswith("checkpoints beside it: step_000002.pt, step_000004.pt"), line
