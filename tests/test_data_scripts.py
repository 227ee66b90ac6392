"""Pins the data scripts, on CPU and without network.

data/synthetic.py: the speedrun shard format (header fields, size, token range, documents opened by EOT of a
sane mean length), bytes fixed by the seed and independent of worker count and chunking, a bigram rule that makes
the conditional entropy far lower than the unigram one (and matches `entropies`), kept valid files, replaced
broken ones, and no shard under its final name after an interrupted run.
data/cached_fineweb10B.py: offline or unreachable hub -> exit code 1 and a message saying what to do (no
traceback), within seconds: a refused connection in under 5 s from the command line, a hub that never answers
in its timeout; valid local files never touch the hub; a broken file is fetched again (forced the second time);
one that stays broken fails with a clear message; the destination holds only whole shards afterwards (no
huggingface_hub .cache, no partial file, no empty folder the run made), whether the run failed or not.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "data"))  # by plain name, so pool workers can import it too
import cached_fineweb10B as cached  # noqa: E402
import synthetic  # noqa: E402
from train_gpt import EOT_TOKEN, read_shard_header  # noqa: E402

NAMES = ["fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]


def write(folder, tokens=40_000, val_tokens=30_000, **kwargs) -> list[Path]:
    return synthetic.write_shards(folder, 2, tokens, val_tokens=val_tokens, progress=False, **kwargs)


def tokens_of(path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", offset=1024)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a, b, c = write(tmp_path / "a"), write(tmp_path / "b"), write(tmp_path / "c", seed=1)
    for pa, pb, pc in zip(a, b, c):
        assert pa.read_bytes() == pb.read_bytes()
        assert not np.array_equal(tokens_of(pa)[:30_000], tokens_of(pc)[:30_000])
    assert not np.array_equal(tokens_of(a[0]), tokens_of(a[1]))  # each shard name gets its own stream


def test_format(tmp_path):
    paths = write(tmp_path, tokens=300_000)
    assert [p.name for p in paths] == NAMES
    for path, count in zip(paths, [300_000, 300_000, 30_000]):
        header = np.fromfile(path, dtype="<i4", count=256)
        assert list(header[:3]) == [20240520, 1, count] and not header[3:].any()
        assert path.stat().st_size == 1024 + 2 * count
        assert read_shard_header(path) == count
    tokens = tokens_of(paths[0])
    assert tokens.max() == EOT_TOKEN and tokens[0] == EOT_TOKEN  # a shard opens a document, like FineWeb's
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    assert 600 < np.diff(starts).mean() < 1600
    assert 0 < np.diff(starts).min() and np.diff(starts).max() > 3000  # lengths vary, as real documents do


def test_a_bigram_rule_makes_it_learnable(tmp_path):
    """The plug-in H(next | previous) of the stream sits far below its unigram entropy, as `entropies` says."""
    vocab = 64
    tokens = tokens_of(write(tmp_path, tokens=400_000, vocab=vocab)[0]).astype(np.int64)
    prev, nxt = tokens[:-1], tokens[1:]
    inside = (prev != EOT_TOKEN) & (nxt != EOT_TOKEN)  # the rule lives inside documents
    pairs = np.bincount(prev[inside] * vocab + nxt[inside], minlength=vocab * vocab).reshape(vocab, vocab)
    joint = pairs / pairs.sum()
    marginal = joint.sum(1)
    nz = joint > 0
    conditional = -(joint[nz] * np.log((joint / marginal[:, None])[nz])).sum()
    unigram = -(marginal[marginal > 0] * np.log(marginal[marginal > 0])).sum()
    want_unigram, want_conditional = synthetic.entropies(vocab)
    assert conditional < unigram - 1.5
    assert abs(conditional - want_conditional) < 0.05 and abs(unigram - want_unigram) < 0.05
    full_unigram, full_conditional = synthetic.entropies()
    assert full_conditional < full_unigram - 4


def test_vocab_and_eot_for_a_small_model(tmp_path):
    tokens = tokens_of(write(tmp_path, vocab=1023, eot=1023)[0])
    assert tokens[0] == 1023 and tokens.max() == 1023 and (tokens == 1023).sum() > 5
    with pytest.raises(ValueError):
        write(tmp_path / "x", eot=EOT_TOKEN + 1)
    with pytest.raises(ValueError):
        write(tmp_path / "y", vocab=1)


def test_workers_do_not_change_the_bytes(tmp_path, monkeypatch):
    pools = []

    class Pool(synthetic.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            pools.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(synthetic, "CHUNK_TOKENS", 7_000)  # several pieces per shard...
    monkeypatch.setattr(synthetic, "POOL_MIN_TOKENS", 0)  # ...spread over a real process pool
    monkeypatch.setattr(synthetic, "ProcessPoolExecutor", Pool)
    one = write(tmp_path / "one", workers=1)
    assert not pools
    two = write(tmp_path / "two", workers=2)
    assert len(pools) == 1
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes()


def test_valid_files_are_kept_and_broken_ones_rewritten(tmp_path):
    paths = write(tmp_path)
    before = [p.read_bytes() for p in paths]
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}
    with open(paths[2], "r+b") as f:
        f.truncate(2000)  # an interrupted copy
    write(tmp_path)
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in paths[:2]] == [stamps[p.name] for p in paths[:2]]
    assert [p.read_bytes() for p in paths] == before
    write(tmp_path, val_tokens=31_000)  # a valid file of another size is not what was asked for
    assert read_shard_header(paths[2]) == 31_000
    assert sorted(os.listdir(tmp_path)) == NAMES  # no temp files left behind


def test_an_interrupted_run_leaves_no_partial_shard(tmp_path, monkeypatch):
    real, calls = synthetic.chunk_tokens, []

    def dies_on_second_shard(*args):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(synthetic, "chunk_tokens", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path)
    assert os.listdir(tmp_path) == [NAMES[0]]


def no_probe(monkeypatch) -> None:
    """Skip the up-front question to the hub, so that only the (replaced) hf_hub_download talks to it."""
    monkeypatch.setattr(cached, "check_hub", lambda repo_id, path: None)


def fake_hub(monkeypatch, source: Path, broken_unless_forced=False, always_broken=False, fail_on=None) -> list:
    """Replace hf_hub_download by a copy from source (truncated when asked; a network error for the file fail_on),
    leaving metadata in local_dir/.cache as huggingface_hub does; return the list of calls."""
    calls = []
    no_probe(monkeypatch)

    def download(repo_id, filename, *, repo_type, local_dir, force_download=False, **_):
        assert repo_type == "dataset"
        calls.append((filename, force_download))
        meta = Path(local_dir) / ".cache" / "huggingface" / "download"
        meta.mkdir(parents=True, exist_ok=True)
        (meta / f"{filename}.lock").touch()
        if filename == fail_on:
            (meta / f"{filename}.incomplete").write_bytes(b"part")
            raise ConnectionError("the network went away")
        target = Path(local_dir) / filename
        shutil.copyfile(source / filename, target)
        if always_broken or (broken_unless_forced and not force_download):
            with open(target, "r+b") as f:
                f.truncate(5000)
        return str(target)

    monkeypatch.setattr(cached, "hf_hub_download", download)
    return calls


@pytest.fixture
def hub_files(tmp_path) -> Path:
    source = tmp_path / "hub"
    synthetic.write_shards(source, 1, 3000, progress=False)  # the same names as the real val + train 1
    return source


def run_script(dest: Path, **env) -> tuple[subprocess.CompletedProcess, float]:
    """Run the download of the val shard and 1 train shard into dest; return the result and the seconds it took."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, str(REPO / "data/cached_fineweb10B.py"), "1", "--dir", str(dest)],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    return run, time.perf_counter() - start


def test_offline_exits_1_with_advice(tmp_path):
    run, _ = run_script(tmp_path / "dest", HF_HUB_OFFLINE="1")
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert "HF_HUB_OFFLINE=1 is set" in run.stderr and "copy the shards" in run.stderr
    assert "fineweb_val_000000.bin" in run.stderr
    assert os.listdir(tmp_path) == []  # no destination folder was made


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_refused_connection_fails_within_seconds(tmp_path):
    """huggingface_hub alone retries for ~23 s; the bound includes Python's start-up on a slow CI machine."""
    run, seconds = run_script(tmp_path / "new" / "dest", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    assert run.returncode == 1 and seconds < 5
    assert "Traceback" not in run.stderr
    assert "could not download fineweb_val_000000.bin" in run.stderr and "HF_ENDPOINT" in run.stderr
    assert os.listdir(tmp_path) == []


def test_a_hub_that_never_answers_fails_in_its_timeout(tmp_path):
    """The kernel accepts the connection and nobody answers: the HEAD hangs until the probe's timeout (1 s here,
    PROBE_TIMEOUT = 4 s by default), with no retries after it."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        run, seconds = run_script(tmp_path / "dest", HF_ENDPOINT=endpoint, HF_HUB_ETAG_TIMEOUT="1")
    assert run.returncode == 1 and 1 <= seconds < 4
    assert "Traceback" not in run.stderr
    assert "no answer from" in run.stderr and "could not download fineweb_val_000000.bin" in run.stderr
    assert os.listdir(tmp_path) == []


def network_errors() -> list[BaseException]:
    from huggingface_hub.errors import LocalEntryNotFoundError
    errors = [ConnectionError("[Errno -2] Name or service not known"), TimeoutError(), LocalEntryNotFoundError("x")]
    for client in ("httpx", "httpx2"):  # whichever HTTP client this huggingface_hub uses
        if client in sys.modules:
            errors.append(sys.modules[client].ConnectError("connection refused"))
    return errors


@pytest.mark.parametrize("where", ["probe", "download"])
@pytest.mark.parametrize("error", network_errors(), ids=lambda e: type(e).__name__)
def test_unreachable_hub_exits_1_with_advice(tmp_path, monkeypatch, capsys, error, where):
    def unreachable(*args, **kwargs):
        raise error

    if where == "probe":
        monkeypatch.setattr(cached, "get_hf_file_metadata", unreachable)
    else:
        no_probe(monkeypatch)
        monkeypatch.setattr(cached, "hf_hub_download", unreachable)
    assert cached.main(["1", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "could not download fineweb_val_000000.bin" in err and "HF_ENDPOINT" in err
    assert "Traceback" not in err


def test_hub_error_exits_1(tmp_path, monkeypatch, capsys):
    from huggingface_hub.errors import HfHubHTTPError
    clients = [sys.modules[name] for name in ("httpx2", "httpx") if name in sys.modules]
    if not clients:
        pytest.skip("this huggingface_hub uses neither httpx nor httpx2")
    response = clients[0].Response(404, request=clients[0].Request("HEAD", "https://huggingface.co/x"))

    def refused(*args, **kwargs):
        raise HfHubHTTPError("404 Client Error: Entry Not Found", response=response)

    no_probe(monkeypatch)
    monkeypatch.setattr(cached, "hf_hub_download", refused)
    assert cached.main(["1", "--dir", str(tmp_path)]) == 1
    assert "refused fineweb_val_000000.bin" in capsys.readouterr().err


def test_valid_local_files_never_touch_the_hub(hub_files, monkeypatch, capsys):
    calls = fake_hub(monkeypatch, hub_files)
    assert cached.main(["1", "--dir", str(hub_files)]) == 0
    assert calls == []
    assert "ready" in capsys.readouterr().out


def test_a_truncated_file_is_fetched_again(tmp_path, hub_files, monkeypatch):
    dest = tmp_path / "dest"
    shutil.copytree(hub_files, dest)
    with open(dest / "fineweb_val_000000.bin", "r+b") as f:
        f.truncate(3000)
    calls = fake_hub(monkeypatch, hub_files)
    paths = cached.download(1, dest, progress=False)
    assert calls == [("fineweb_val_000000.bin", False)]
    assert all(cached.verify(p) is None for p in paths)


def test_a_bad_download_is_forced_once_more(tmp_path, hub_files, monkeypatch):
    calls = fake_hub(monkeypatch, hub_files, broken_unless_forced=True)
    paths = cached.download(1, tmp_path / "dest", progress=False)
    assert calls == [("fineweb_val_000000.bin", False), ("fineweb_val_000000.bin", True),
                     ("fineweb_train_000001.bin", False), ("fineweb_train_000001.bin", True)]
    assert all(cached.verify(p) is None for p in paths)
    assert sorted(os.listdir(tmp_path / "dest")) == sorted(p.name for p in paths)  # and no .cache


def test_a_file_that_stays_broken_fails_clearly(tmp_path, hub_files, monkeypatch, capsys):
    calls = fake_hub(monkeypatch, hub_files, always_broken=True)
    assert cached.main(["1", "--dir", str(tmp_path / "dest")]) == 1
    assert len(calls) == 2
    err = capsys.readouterr().err
    assert "fineweb_val_000000.bin is still broken after downloading it twice" in err and "truncated" in err
    assert os.listdir(tmp_path) == ["hub"]  # the broken copy went with the temporary folder, dest with it


def test_a_failed_download_leaves_nothing_half_made(tmp_path, hub_files, monkeypatch, capsys):
    dest = tmp_path / "new" / "dest"
    fake_hub(monkeypatch, hub_files, fail_on="fineweb_val_000000.bin")
    assert cached.main(["1", "--dir", str(dest)]) == 1
    assert os.listdir(tmp_path) == ["hub"]  # the folders this run made are gone
    fake_hub(monkeypatch, hub_files, fail_on="fineweb_train_000001.bin")
    assert cached.main(["1", "--dir", str(dest)]) == 1
    assert os.listdir(dest) == ["fineweb_val_000000.bin"]  # the whole shard stays, for the next run
    assert "could not download fineweb_train_000001.bin" in capsys.readouterr().err
