"""Download the FineWeb-10B GPT-2 token shards (the val shard and the first N train shards) from the Hugging Face
dataset kjj0/fineweb10B-gpt2 into data/fineweb10B/ (next to this script, whatever the working directory).

    python data/cached_fineweb10B.py 8

Files already there are kept when their header and size check out (train_gpt.read_shard_header), so a rerun
only fetches what is missing or broken. Every download is checked the same way and fetched once more, forced,
if it is truncated or corrupt. Shards are fetched into a temporary folder inside the destination and moved to
their names only once whole, so a failed or interrupted run leaves no partial file, no huggingface_hub metadata
(.cache) and no folder it made that stayed empty. Before the first download the hub is asked once, without retries,
and must answer within 4 s (HF_HUB_ETAG_TIMEOUT, if set, on slow networks): when it can't be reached the script
says what to do and exits with code 1 within seconds, instead of after huggingface_hub's ~23 s of retries.
"""
import argparse
import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root, for train_gpt

REPO_ID = "kjj0/fineweb10B-gpt2"
DEFAULT_DIR = Path(__file__).resolve().parent / "fineweb10B"
VAL_NAME = "fineweb_val_000000.bin"
PROBE_TIMEOUT = 4  # s the hub gets to answer the first question; a HEAD needs a few round trips even on slow links


class DownloadError(Exception):
    """A shard could not be fetched or stays broken; the message says what to do."""


def shard_names(n: int) -> list[str]:
    return [VAL_NAME] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n + 1)]


def verify(path) -> str | None:
    """None when the shard is whole (its header and size agree), else what is wrong with it."""
    if not Path(path).is_file():
        return f"{path}: no such file"
    from train_gpt import DataError, read_shard_header  # only here: it imports torch, seconds a first run can skip
    try:
        read_shard_header(path)
    except DataError as e:
        return str(e)
    return None


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "no answer from the hub". OSError covers huggingface_hub's LocalEntryNotFoundError and
    OfflineModeIsEnabled, requests' errors and our TimeoutError; its HTTP client differs by version, so add httpx's
    if loaded."""
    clients = [sys.modules[name] for name in ("httpx", "httpx2") if name in sys.modules]
    return (OSError, *(client.TransportError for client in clients))


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or ['no details'])[0]}"


@contextmanager
def _hub_errors(repo_id: str, path: Path):
    """Turn the hub's errors about path into a DownloadError that says what to do."""
    try:
        yield
    except HfHubHTTPError as e:  # the hub answered, with an error (a missing file, a wrong repo, access)
        raise DownloadError(f"the hub at {constants.ENDPOINT} refused {path.name} of dataset {repo_id} "
                            f"({_first_line(e)}). Check the repo name (--repo) and that the shard number exists "
                            f"(the dataset has 103 train shards).") from None
    except _network_errors() as e:
        if constants.HF_HUB_OFFLINE:
            why = "HF_HUB_OFFLINE=1 is set, so the hub was not contacted: unset it to download"
        else:
            why = (f"Check the network connection and proxy, and that HF_ENDPOINT (now {constants.ENDPOINT}) "
                   f"points at a reachable hub or mirror")
        raise DownloadError(f"could not download {path.name} from the Hugging Face dataset {repo_id} "
                            f"({_first_line(e)}). {why}. Without network, copy the shards from a machine that has "
                            f"them into {path.parent}, or make synthetic shards for benchmarks that don't need real "
                            f"text: python data/synthetic.py.") from None


def check_hub(repo_id: str, path: Path) -> None:
    """Ask the hub about path once, without retries, and give it PROBE_TIMEOUT s. hf_hub_download retries a failed
    question 5 times (~23 s of backoff, minutes when connections hang): good on a flaky network, a long wait on a
    dead one."""
    timeout = constants.HF_HUB_ETAG_TIMEOUT if "HF_HUB_ETAG_TIMEOUT" in os.environ else PROBE_TIMEOUT
    url = hf_hub_url(repo_id, path.name, repo_type="dataset")
    errors = []

    def ask():
        try:
            get_hf_file_metadata(url, timeout=timeout)
        except Exception as e:
            errors.append(e)

    # In a daemon thread because DNS lookups ignore the timeout: one that hangs is left behind and doesn't hold
    # up the exit.
    asker = threading.Thread(target=ask, daemon=True)
    asker.start()
    asker.join(timeout)
    with _hub_errors(repo_id, path):
        if asker.is_alive():
            raise TimeoutError(f"no answer from {constants.ENDPOINT} within {timeout} s; HF_HUB_ETAG_TIMEOUT "
                               f"gives it longer")
        if errors:
            raise errors[0]


def _fetch(repo_id: str, path: Path, folder: Path) -> None:
    """Download path's shard into folder, verify it, and move it to path."""
    for force in (False, True):
        with _hub_errors(repo_id, path):
            got = Path(hf_hub_download(repo_id, path.name, repo_type="dataset", local_dir=folder,
                                       force_download=force))
        problem = verify(got)
        if problem is None:
            got.replace(path)
            return
    raise DownloadError(f"{path.name} is still broken after downloading it twice: {problem.removeprefix(f'{got}: ')}. "
                        f"Run this again; if it stays broken, the copy at {constants.ENDPOINT} is bad.")


def download(n: int, dest=DEFAULT_DIR, repo_id: str = REPO_ID, progress: bool = True) -> list[Path]:
    """Make dest hold the val shard and the first n train shards, each verified; return their paths."""
    if n < 0:
        raise ValueError(f"the number of train shards must be >= 0, got {n}")
    dest = Path(dest)
    paths = [dest / name for name in shard_names(n)]
    missing = [path for path in paths if verify(path) is not None]
    if not missing:
        return paths
    check_hub(repo_id, missing[0])
    made = [folder for folder in (dest, *dest.parents) if not folder.exists()]  # deepest first
    dest.mkdir(parents=True, exist_ok=True)
    try:
        # huggingface_hub keeps its metadata (.cache: locks, etags, partial downloads) in the folder it downloads
        # to. This script checks the files itself and never asks the hub about one it has, so none of it is needed
        # after the run: a temporary folder takes it, on dest's file system so that moving a shard is instant.
        with tempfile.TemporaryDirectory(prefix=".download-", dir=dest) as folder:
            for path in tqdm(missing, desc="fineweb10B", unit="shard", disable=not progress):
                path.unlink(missing_ok=True)  # a broken copy is of no use, and must not outlive a failed run
                _fetch(repo_id, path, Path(folder))
    finally:
        for folder in made:  # the folders this run made, if they stayed empty
            try:
                folder.rmdir()
            except OSError:
                break
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=8,
                    help="train shards to fetch, 100M tokens each (default 8: 800M tokens, enough for the record "
                         "run's 1393 steps x 524,288 tokens = 730M)")
    ap.add_argument("--dir", default=str(DEFAULT_DIR), help="where the shards go (default: %(default)s)")
    ap.add_argument("--repo", default=REPO_ID, help="Hugging Face dataset repo (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.n < 0:
        ap.error(f"n must be >= 0, got {args.n}")
    try:
        download(args.n, args.dir, args.repo)
    except DownloadError as e:
        print(f"cached_fineweb10B: {e}", file=sys.stderr)
        return 1
    print(f"fineweb10B: the val shard and {args.n} train shards are ready in {args.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
