"""Deterministic synthetic token shards in the FineWeb/speedrun format, for GPU benchmarks and the CPU smoke run.

A shard is a 256 x int32 header (magic, version, token count) followed by uint16 GPT-2 token ids, exactly like
the real `fineweb_*.bin` files. The content imitates text closely enough for a language model to learn:
  * documents have lognormal lengths (mean ~1000 tokens) and each starts with end-of-text (50256);
  * a "fresh" token is Zipf distributed over ids 0..V-1: id r has probability log((r+2)/(r+1)) / log(V+1);
  * with probability FOLLOW_P a token is instead follow[previous token], a seeded permutation of the ids,
so a model that learns this bigram rule reaches a loss well below the unigram entropy (see `entropies`).

Shards are cut into CHUNK_TOKENS pieces that a process pool generates and writes straight into the shard's temp
file; each piece depends only on (seed, vocab, eot, shard name, piece index), never on the number of workers.
The format's constants and header check come from train_gpt.py, imported only by the parent process: it imports
torch (~15 s on a GPU box), which the workers don't need.

    python data/synthetic.py --out data/synthetic --train_shards 9 --tokens 100000000
    python data/synthetic.py --out data/small --vocab 1023 --eot 1023 ...  # for a model with vocab_size=1024
"""
import argparse
import hashlib
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path

import numpy as np
from tqdm import tqdm

FOLLOW_P = 0.6          # chance that a token is follow[previous] rather than a fresh Zipf draw
MEAN_DOC = 1000         # mean document length in tokens, about FineWeb's
DOC_SIGMA = 1.0         # lognormal spread of document lengths (median ~600 for mean 1000)
CHUNK_TOKENS = 1 << 22  # one process's unit of work (~0.1 s, 8 MB); fixed, since content depends on it
POOL_MIN_TOKENS = 1 << 24  # below this, generating in-process beats starting a pool


def shard_names(num_train_shards: int) -> list[str]:
    """File names in the speedrun's layout: train shards numbered from 1, then the single val shard."""
    return [f"fineweb_train_{i:06d}.bin" for i in range(1, num_train_shards + 1)] + ["fineweb_val_000000.bin"]


@cache
def _train_gpt():
    """train_gpt, imported on first use in the parent process only (see the module docstring)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root
    import train_gpt
    return train_gpt


def _vocab(vocab: int | None, eot: int | None) -> tuple[int, int]:
    """(ordinary ids 0..n-1, end-of-text id), checked so that every token stays a GPT-2 id (< 50257)."""
    gpt2_eot = _train_gpt().EOT_TOKEN
    eot = gpt2_eot if eot is None else eot
    vocab = eot if vocab is None else vocab
    if not 2 <= eot <= gpt2_eot:
        raise ValueError(f"eot must be in [2, {gpt2_eot}], got {eot}")
    if vocab < 2:
        raise ValueError(f"vocab must be at least 2, got {vocab}")
    return min(vocab, eot), eot  # vocab=50257 (GPT-2's size, counting EOT) means all ordinary ids


def _zipf_probs(n: int) -> np.ndarray:
    r = np.arange(n)
    return np.log((r + 2) / (r + 1)) / np.log(n + 1)


def _zipf(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """Ranks with probabilities _zipf_probs(n): floor((n+1)**u) - 1 inverts that CDF in closed form (no table)."""
    ranks = np.exp(rng.random(size) * np.log(n + 1)).astype(np.int64) - 1
    return np.minimum(ranks, n - 1)  # float rounding can reach n when u is within 1e-16 of 1


@cache
def _follow_powers(seed: int, n: int, rows: int) -> np.ndarray:
    """powers[k] = the bigram rule applied k times, so a token k steps after the last fresh one is one lookup.

    The rule is one seeded permutation per (seed, vocab), shared by all shards so that train and val agree.
    """
    follow = np.random.default_rng([seed, 0, n]).permutation(n)
    powers = np.empty((rows, n), np.int32)
    powers[0] = np.arange(n)
    for k in range(1, rows):
        powers[k] = follow[powers[k - 1]]
    return powers


def _name_key(name: str) -> int:
    """A stable 64-bit number for a shard name (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


def chunk_tokens(seed: int, name: str, chunk: int, count: int, n: int, eot: int) -> np.ndarray:
    """Tokens of piece `chunk` (count of them) of shard `name`, ordinary ids < n, as little-endian uint16."""
    rng = np.random.default_rng([seed, 1, _name_key(name), chunk])
    # Document starts. Twice the expected number of lengths is (practically) always enough; if not, the tail is
    # just one long document. Piece 0 opens a document; later pieces begin inside one, as a real shard would.
    lengths = np.maximum(2, rng.lognormal(np.log(MEAN_DOC) - DOC_SIGMA**2 / 2, DOC_SIGMA, 2 * count // MEAN_DOC + 8))
    lengths = lengths.astype(np.int64)
    offset = 0 if chunk == 0 else rng.integers(lengths[0])
    starts = np.cumsum(lengths) - lengths[0] - offset
    starts = starts[(starts >= 0) & (starts < count)]

    fresh = rng.random(count, dtype=np.float32) >= FOLLOW_P
    fresh[0] = True
    after = starts + 1
    fresh[after[after < count]] = True  # a document never continues the previous one's chain
    drawn = np.zeros(count, np.int32)
    drawn[fresh] = _zipf(rng, int(fresh.sum()), n)

    # Every other token is follow[previous], i.e. follow applied `depth` times to the last fresh token, where
    # depth is the distance back to it: one table lookup per token instead of a sequential chain.
    idx = np.arange(count, dtype=np.int32)
    last = np.maximum.accumulate(np.where(fresh, idx, 0))
    depth = idx - last
    rows = 64  # depth >= 64 has probability 0.6**64 ~ 1e-14 per token, but stay correct if it happens
    while rows <= depth.max():
        rows *= 2
    tokens = _follow_powers(seed, n, rows)[depth, drawn[last]]
    tokens[starts] = eot
    return tokens.astype("<u2")


def _fill(task: tuple) -> str:
    """Worker: generate one piece, write it at its place in the shard's (pre-sized) temp file; return the shard."""
    tmp, offset, name, chunk, count, seed, n, eot = task
    data = chunk_tokens(seed, name, chunk, count, n, eot).tobytes()
    fd = os.open(tmp, os.O_WRONLY)
    try:
        if os.pwrite(fd, data, offset) != len(data):
            raise OSError(f"short write to {tmp} (disk full?)")
    finally:
        os.close(fd)
    return name


def _sizes(num_train_shards: int, tokens_per_shard: int, val_tokens: int | None) -> dict[str, int]:
    counts = [tokens_per_shard] * num_train_shards + [tokens_per_shard if val_tokens is None else val_tokens]
    if min(counts) < 1:
        raise ValueError(f"shards need at least one token, got {counts}")
    return dict(zip(shard_names(num_train_shards), counts))


def _is_valid(path: Path, count: int) -> bool:
    tg = _train_gpt()
    try:
        return tg.read_shard_header(path) == count
    except tg.DataError:
        return False


def _todo(out: Path, sizes: dict[str, int]) -> list[str]:
    return [name for name, count in sizes.items() if not _is_valid(out / name, count)]


def _run(tasks: list[tuple], workers: int):
    """Run the tasks, yielding each one's shard name as it finishes, in order. forkserver, not fork: the caller
    may have torch's threads running, and forking a threaded process can deadlock; children of a clean server
    can't inherit a held lock."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_fill, tasks)
        return
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context("forkserver"))
    try:
        yield from pool.map(_fill, tasks)
    finally:
        pool.shutdown(cancel_futures=True)  # on Ctrl-C, don't start the queued pieces


def write_shards(out_dir, num_train_shards: int, tokens_per_shard: int, val_tokens: int | None = None,
                 seed: int = 0, workers: int | None = None, progress: bool = True,
                 vocab: int | None = None, eot: int | None = None) -> list[Path]:
    """Write fineweb_train_000001.bin.. and fineweb_val_000000.bin into out_dir; return their paths.

    Files that already have a valid header and the requested token count are kept (whatever seed made them).
    Each shard is written to a temp file and renamed when complete, so an interrupted run never leaves a
    truncated shard under a final name. Ordinary token ids are < vocab (default: all GPT-2 ids) and documents
    start with `eot` (default 50256); a model with vocab_size V (which takes V-1 as end-of-text) wants eot=V-1.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = _sizes(num_train_shards, tokens_per_shard, val_tokens)
    n, eot = _vocab(vocab, eot)  # fail on a bad vocab before touching any file
    tg = _train_gpt()
    todo = _todo(out, sizes)
    chunk = CHUNK_TOKENS  # read once, so all pieces agree on the layout
    tmps = {name: out / f".{name}.{os.getpid()}.tmp" for name in todo}
    left = {name: -(-sizes[name] // chunk) for name in todo}  # pieces still to write, per shard
    tasks = [(str(tmps[name]), tg.HEADER_INTS * 4 + 2 * c * chunk, name, c, min(chunk, sizes[name] - c * chunk),
              seed, n, eot) for name in todo for c in range(left[name])]
    workers = workers or len(os.sched_getaffinity(0))
    if sum(sizes[name] for name in todo) < POOL_MIN_TOKENS:
        workers = 1
    bar = tqdm(total=len(sizes), initial=len(sizes) - len(todo), unit="shard", desc="synthetic", disable=not progress)
    try:
        for name in todo:
            header = np.zeros(tg.HEADER_INTS, "<i4")
            header[:3] = tg.SHARD_MAGIC, tg.SHARD_VERSION, sizes[name]
            with open(tmps[name], "wb") as f:
                f.write(header.tobytes())
                f.truncate(header.nbytes + 2 * sizes[name])
        for name in _run(tasks, workers):
            left[name] -= 1
            if not left[name]:
                # No fsync: a kill can't leave a partial file under the final name; a power cut is not worth the
                # cost for data that a rerun regenerates.
                os.replace(tmps[name], out / name)
                bar.update()
    finally:
        bar.close()
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
    return [out / name for name in sizes]


def entropies(vocab: int | None = None, seed: int = 0, eot: int | None = None) -> tuple[float, float]:
    """(unigram entropy, conditional entropy of a token given its predecessor) of the process, in nats.

    The second is the loss of a perfect model; document boundaries (~0.1% of tokens) are ignored.
    """
    (n, _), p = _vocab(vocab, eot), FOLLOW_P
    q, follow = _zipf_probs(n), _follow_powers(seed, n, 64)[1]
    pi = q.copy()
    for _ in range(200):  # stationary distribution of pi = (1-p) q + p (pi pushed through follow); error p**200
        nxt = (1 - p) * q
        nxt[follow] += p * pi
        pi = nxt
    fresh = (1 - p) * q
    hit = p + fresh[follow]  # probability of the rule's prediction
    row = -(fresh * np.log(fresh)).sum() + fresh[follow] * np.log(fresh[follow]) - hit * np.log(hit)
    return float(-(pi * np.log(pi)).sum()), float((pi * row).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "synthetic"), help="output directory")
    ap.add_argument("--train_shards", type=int, default=9)
    ap.add_argument("--tokens", type=int, default=100_000_000, help="tokens per train shard")
    ap.add_argument("--val_tokens", type=int, default=None, help="tokens in the val shard (default: --tokens)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    ap.add_argument("--vocab", type=int, default=None, help="ordinary token ids are < vocab (default: all GPT-2's)")
    ap.add_argument("--eot", type=int, default=None, help="the end-of-text id that opens documents (default 50256)")
    args = ap.parse_args(argv)
    try:
        sizes = _sizes(args.train_shards, args.tokens, args.val_tokens)
        _vocab(args.vocab, args.eot)
    except ValueError as e:
        ap.error(str(e))
    todo = _todo(Path(args.out), sizes)
    t0 = time.perf_counter()
    try:
        write_shards(args.out, args.train_shards, args.tokens, args.val_tokens, args.seed, args.workers,
                     vocab=args.vocab, eot=args.eot)
    except KeyboardInterrupt:
        print("\nsynthetic: interrupted; finished shards are kept, unfinished ones removed", file=sys.stderr)
        return 130
    unigram, conditional = entropies(args.vocab, args.seed, args.eot)
    print(f"synthetic: wrote {len(todo)} shard(s), {sum(sizes[n] for n in todo):,} tokens, in "
          f"{time.perf_counter() - t0:.1f}s to {args.out} ({len(sizes) - len(todo)} already there); "
          f"unigram entropy {unigram:.2f} nats, best possible loss {conditional:.2f} nats")
    return 0


if __name__ == "__main__":
    sys.exit(main())
