"""The data checks that run before anything is compiled: every bad input (missing folder, no matching files,
bad magic, bad version, a truncated body, a header promising more tokens than the file has, too few tokens for
the run, a short val file, a token id outside the vocabulary) stops the run with its own message naming the file
and the fix; the data's fingerprint changes with any byte of a shard, and a checkpoint is refused on data other
than its own, naming the shard; the smoke preset's folder is made once and refused, not rewritten, once altered;
and the loader's batches (rank slices, shard switches with background reads) are the record's, with targets in a
tensor of their own, as the warm-up's dummy batches have them."""
import dataclasses
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from train_gpt import (HEADER_INTS, SHARD_MAGIC, DataError, Hyperparameters, TrainLoader, batch_to_device,
                       batches_in_shard, check_data, check_resumed_data, data_difference, val_batches)

REPO = Path(__file__).resolve().parent.parent


def write_shard(path: Path, tokens: np.ndarray, magic=SHARD_MAGIC, version=1, count=None) -> Path:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens) if count is None else count
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + tokens.astype("<u2").tobytes())
    return path


def small_args(folder: Path, **kw) -> Hyperparameters:
    """4 steps of 2 x 128 tokens, val 256 tokens."""
    files = dict(train_files=str(folder / "fineweb_train_*.bin"), val_files=str(folder / "fineweb_val_*.bin"))
    return Hyperparameters(**{**files, **kw}, batch_seqs=2, seq_len=128, val_tokens=256, num_iterations=4)


def good_data(folder: Path):
    rng = np.random.default_rng(0)
    for i in (1, 2):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", rng.integers(0, 50257, 600))  # 2 steps each
    write_shard(folder / "fineweb_val_000000.bin", rng.integers(0, 50257, 300))


def test_good_data_passes(tmp_path):
    good_data(tmp_path)
    train, val, fingerprint = check_data(small_args(tmp_path))
    assert [Path(f).name for f in train] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert Path(val).name == "fineweb_val_000000.bin"
    assert [(path, size) for path, size, _ in fingerprint] == [(f, 1024 + 1200) for f in train] + [(val, 1024 + 600)]


@pytest.mark.parametrize("damage, message", [
    ("no_folder", "no data folder"),
    ("no_files", "no train shards match"),
    ("magic", "magic number 12345, expected 20240520"),
    ("version", "format version 7"),
    ("short_header", "shorter than its 1024-byte header"),
    ("truncated_body", "holds 400 of the 600 tokens its header promises: truncated"),
    ("count_too_large", "holds 600 of the 900 tokens its header promises"),
    ("count_too_small", "bytes more than the 500 tokens its header says: corrupt"),
    ("too_few_tokens", "feed 2 steps of 256 tokens, and num_iterations=4"),
    ("no_val", "no val shard matches"),
    ("short_val", "fewer than val_tokens + 1 = 257 tokens"),
])
def test_each_bad_input_has_its_own_error(tmp_path, damage, message):
    good_data(tmp_path)
    first, val = tmp_path / "fineweb_train_000001.bin", tmp_path / "fineweb_val_000000.bin"
    tokens = np.arange(600)
    args = small_args(tmp_path)
    if damage == "no_folder":
        args = small_args(tmp_path / "missing")
    elif damage == "no_files":
        args = small_args(tmp_path, train_files=str(tmp_path / "fineweb_tran_*.bin"))
    elif damage == "magic":
        write_shard(first, tokens, magic=12345)
    elif damage == "version":
        write_shard(first, tokens, version=7)
    elif damage == "short_header":
        first.write_bytes(first.read_bytes()[:100])
    elif damage == "truncated_body":
        first.write_bytes(first.read_bytes()[:HEADER_INTS * 4 + 800])
    elif damage == "count_too_large":
        write_shard(first, tokens, count=900)
    elif damage == "count_too_small":
        write_shard(first, tokens, count=500)
    elif damage == "too_few_tokens":
        (tmp_path / "fineweb_train_000002.bin").unlink()
    elif damage == "no_val":
        val.unlink()
    elif damage == "short_val":
        write_shard(val, np.arange(200))
    with pytest.raises(DataError, match=re.escape(message)) as error:
        check_data(args)
    text = str(error.value)
    assert "fineweb" in text  # names the file or the pattern
    if damage not in ("short_val",):
        assert "download" in text or "data/cached_fineweb10B.py" in text  # and the fix


def test_bad_data_stops_before_training(tmp_path):
    """From the command line: exit code 2, one clear line, no traceback, no log, nothing compiled."""
    good_data(tmp_path)
    write_shard(tmp_path / "fineweb_train_000002.bin", np.arange(600), magic=1)
    argv = [f"--train_files={tmp_path}/fineweb_train_*.bin", f"--val_files={tmp_path}/fineweb_val_*.bin",
            "--batch_seqs=2", "--seq_len=128", "--val_tokens=256", "--num_iterations=4"]
    result = subprocess.run([sys.executable, str(REPO / "train_gpt.py"), *argv], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "fineweb_train_000002.bin: magic number 1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "records").exists()


@pytest.mark.parametrize("name", ["fineweb_train_000002.bin", "fineweb_val_000000.bin"])
def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, name):
    """Another tokenizer's shard (or a wrong --vocab_size) is refused at launch, naming the file and its largest id,
    not mid-run by an IndexError (on a GPU, a device-side assert)."""
    rng = np.random.default_rng(1)
    for shard, count in [("fineweb_train_000001.bin", 600), ("fineweb_train_000002.bin", 600),
                         ("fineweb_val_000000.bin", 300)]:
        tokens = rng.integers(0, 1030, count)
        tokens[count // 2] = 1030 if shard == name else 0
        write_shard(tmp_path / shard, tokens)
    check_data(small_args(tmp_path, vocab_size=1031))
    with pytest.raises(DataError) as error:
        check_data(small_args(tmp_path, vocab_size=1030))
    assert str(error.value) == (f"{tmp_path / name}: token ids up to 1030, and vocab_size=1030: a shard of another "
                                f"tokenizer, or the wrong --vocab_size")


def test_the_fingerprint_changes_with_any_byte_of_a_shard(tmp_path):
    good_data(tmp_path)
    args = small_args(tmp_path)
    *_, before = check_data(args)
    second = tmp_path / "fineweb_train_000002.bin"
    flipped = bytearray(second.read_bytes())
    flipped[HEADER_INTS * 4 + 701] ^= 0x01  # the high byte of token 350: still a valid id
    second.write_bytes(flipped)
    *_, now = check_data(args)
    assert [entry != old for entry, old in zip(now, before)] == [False, True, False]
    assert data_difference(before, now) == f"{second}: other content (same size, another sha256)"
    write_shard(second, np.arange(700))
    assert data_difference(before, check_data(args)[2]) == f"{second}: 2,424 bytes, not 2,224"
    second.unlink()
    *_, fewer = check_data(dataclasses.replace(args, num_iterations=2))
    assert data_difference(before, fewer) == f"{second}: missing"
    assert data_difference(fewer, before) == f"{second}: a shard more"


def test_resume_is_refused_on_other_data(tmp_path):
    """cp shard 1 over shard 2: a valid shard of the same size, and refused, naming shard 2."""
    good_data(tmp_path)
    *_, fingerprint = check_data(small_args(tmp_path))
    ckpt = dict(path="step_000004.pt", data_fingerprint=fingerprint)
    check_resumed_data(ckpt, fingerprint)
    first, second = tmp_path / "fineweb_train_000001.bin", tmp_path / "fineweb_train_000002.bin"
    second.write_bytes(first.read_bytes())
    with pytest.raises(DataError) as error:
        check_resumed_data(ckpt, check_data(small_args(tmp_path))[2])
    assert str(error.value) == (f"--resume=step_000004.pt trained on other data: {second}: other content (same size, "
                                f"another sha256); resume it on its own data")


def test_a_checkpoint_without_checksum_and_fingerprint_is_refused(tmp_path):
    """As the code before checksums and fingerprints saved them: its data can't be checked, so it is refused."""
    args = small_args(tmp_path)
    torch.save(dict(args=dataclasses.asdict(args), model={}, step=4), tmp_path / "step_000004.pt")
    with pytest.raises(train_gpt.ConfigError, match="is damaged \\(no checksum: an older train_gpt.py saved it\\)"):
        train_gpt.load_checkpoint(str(tmp_path / "step_000004.pt"), args)


def test_the_smoke_folder_is_made_once_and_refused_once_altered(tmp_path, monkeypatch):
    """Made complete or not at all, never written over: an altered folder is refused with a line that says to
    delete it. The first two train shards and the val shard are those the 20-step smoke run has always had."""
    monkeypatch.chdir(tmp_path)
    args = train_gpt.parse_args(["--preset=smoke"])
    assert train_gpt.ready_smoke_data(args).startswith("smoke data: made")
    folder = tmp_path / train_gpt.SMOKE_DATA
    made = {f.name: f.read_bytes() for f in folder.iterdir()}
    assert sorted(made) == sorted([*train_gpt.SMOKE_SHARDS, train_gpt.SMOKE_MADE])
    assert [f.name for f in tmp_path.joinpath("data").iterdir()] == [folder.name]  # no temporary folder left
    kept = ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]  # SMOKE_LOSSES' data
    assert [hashlib.sha256(made[name]).hexdigest()[:12] for name in kept] == ["e0a86463f746", "e4a40b35335c",
                                                                              "cc6bf1cf2ac2"]
    assert train_gpt.ready_smoke_data(args) == f"smoke data: the preset's own, in {train_gpt.SMOKE_DATA}"
    *_, fingerprint = check_data(args)  # holds the default run's data, with ids below the preset's vocab_size
    assert [Path(path).name for path, _, _ in fingerprint] == kept  # the shards its 20 steps read, and no more

    changed = made["fineweb_train_000003.bin"][:-2] + b"\x01\x00"  # one valid token id changed
    for name, content, problem in [("fineweb_train_000003.bin", changed, "has changed"),
                                   ("fineweb_train_000004.bin", None, "is missing"),
                                   ("fineweb_train_000009.bin", made["fineweb_train_000003.bin"], "was not made by it"),
                                   (train_gpt.SMOKE_MADE, None, "is missing")]:
        (folder / name).unlink() if content is None else (folder / name).write_bytes(content)
        files = {f.name: f.read_bytes() for f in folder.iterdir()}
        with pytest.raises(DataError) as error:
            train_gpt.ready_smoke_data(args)
        assert str(error.value) == (f"{train_gpt.SMOKE_DATA} is not as the smoke preset made it ({name} {problem}); "
                                    f"delete it, and the next run makes it anew: rm -r {train_gpt.SMOKE_DATA}")
        assert {f.name: f.read_bytes() for f in folder.iterdir()} == files  # refused, not rewritten
        (folder / name).write_bytes(made[name]) if name in made else (folder / name).unlink()


def test_batches_in_shard_matches_the_record():
    """The record moves to the next shard when pos + batch + 1 >= len: 190 steps of a 100M-token shard."""
    assert batches_in_shard(100_000_000, 524_288) == 190
    for n in range(10, 40):
        pos, count = 0, 0
        while not pos + 8 + 1 >= n:
            pos, count = pos + 8, count + 1
        assert batches_in_shard(n, 8) == count


def test_loader_slices_and_shard_switch(tmp_path):
    """Rank r gets the r-th slice of each step's tokens (+1 for the targets); shards are switched as in the
    record; two ranks together see exactly what one rank sees."""
    a = write_shard(tmp_path / "a.bin", np.arange(0, 40))
    b = write_shard(tmp_path / "b.bin", np.arange(1000, 1040))
    one = TrainLoader([str(a), str(b)], 16, rank=0, world_size=1, device=torch.device("cpu"))
    steps = [one.next_batch() for _ in range(4)]
    assert [x[0].item() for x, _ in steps] == [0, 16, 1000, 1016]  # 40 tokens hold 2 batches of 16 (+1)
    for x, y in steps:
        assert torch.equal(y[:-1], x[1:].long()) and len(x) == 16
    assert one.state() == dict(shard=1, pos=32)
    halves = [TrainLoader([str(a), str(b)], 16, rank=r, world_size=2, device=torch.device("cpu")) for r in (0, 1)]
    for x, y in steps:
        parts = [loader.next_batch() for loader in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    resumed = TrainLoader([str(a), str(b)], 16, rank=0, world_size=1, device=torch.device("cpu"), shard=1, pos=0)
    assert torch.equal(resumed.next_batch()[0], steps[2][0])


@pytest.mark.parametrize("dtype", [torch.uint16, torch.int32])  # a shard's tokens; the warm-up's dummy ones
def test_batch_targets_are_a_tensor_of_their_own(dtype):
    """Not a view one token into the tokens: the head loss's Triton kernels specialise on the targets' alignment,
    and the warm-up must compile them for the loader's."""
    inputs, targets = batch_to_device(torch.arange(11).to(dtype), torch.device("cpu"))
    assert inputs.dtype == torch.int32 and torch.equal(inputs, torch.arange(10, dtype=torch.int32))
    assert targets.dtype == torch.int64 and torch.equal(targets, torch.arange(1, 11))
    assert targets.storage_offset() == 0


def test_val_batches_cover_the_same_sequences_on_any_world_size():
    tokens = torch.arange(1025).to(torch.uint16)
    args = Hyperparameters(val_tokens=1024, seq_len=128)
    one = [x for x, _ in val_batches(tokens, args, 0, 1, torch.device("cpu"))]
    four = [x for r in range(4) for x, _ in val_batches(tokens, args, r, 4, torch.device("cpu"))]
    assert sorted(x[0].item() for x in one) == sorted(x[0].item() for x in four) == list(range(0, 1024, 128))
