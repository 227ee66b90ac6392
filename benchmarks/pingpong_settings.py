"""The ping-pong Gluon matmuls' settings that make a 1-GPU step fastest, from benchmarks/gluon_matmul_diag.py's
output: each "train_gpt's op" time (its wgmma groups in flight from the header, its stages from the tile), times
the op's calls a step, summed over the four ops for each number of groups in flight with each op's fastest stages
(the MLP's forward and backward share theirs). Prints the table and the best settings, and writes train_gpt.py
with them to OUT (for a side-by-side run against this one). Exit status 0 if they save at least --min_ms a step
against train_gpt.py's own settings (timed in the same outputs), else 3.

    python3 benchmarks/gluon_matmul_diag.py --op_stages=3,5 > diag1.txt
    python3 benchmarks/gluon_matmul_diag.py --op_stages=3,5 --in_flight=2 > diag2.txt
    python3 benchmarks/pingpong_settings.py OUT.py diag1.txt diag2.txt [--min_ms=2]
"""
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402

# calls a 1-GPU step, 8 sequences of 64K tokens: 12 MLPs, 11 attention blocks (NO_ATTENTION_LAYER has none), the
# head's chunks
CALLS = {"MLP forward": 8 * 12, "MLP backward": 8 * 12, "qkv matmul with its prep": 8 * 11,
         "FP8 logits, a chunk": 8 * (64 * 1024 // tg.HEAD_CHUNK)}
TILES = {"MLP forward": "MLP_MATMUL", "MLP backward": "MLP_MATMUL", "qkv matmul with its prep": "QKV_MATMUL",
         "FP8 logits, a chunk": "HEAD_MATMUL"}


def read(paths: list[str]) -> dict[tuple[str, int, int], float]:
    """-> {(op, groups in flight, stages): ms a call}, the fastest where a setting was timed more than once."""
    times = {}
    for path in paths:
        in_flight, case = 1, None
        for line in Path(path).read_text().splitlines():
            if m := re.search(r"; (\d+) wgmma groups in flight", line):
                in_flight = int(m.group(1))
            elif m := re.match(r"(\S.*?): \d+ x \d+ @", line):
                case = m.group(1)
            elif case in CALLS and (m := re.match(r"  train_gpt's op, \d+x\d+x\d+x(\d+) +([\d.]+) ms", line)):
                key = (case, in_flight, int(m.group(1)))
                times[key] = min(times.get(key, float("inf")), float(m.group(2)))
    return times


def best_stages(times: dict, in_flight: int) -> tuple[float, dict[str, int]] | None:
    """-> (ms a step, {tile: stages}) with each tile's fastest stages at in_flight; None where an op is missing."""
    total, stages = 0.0, {}
    for tile in dict.fromkeys(TILES.values()):
        ops = [op for op in CALLS if TILES[op] == tile]
        options = set.intersection(*({s for (o, f, s) in times if o == op and f == in_flight} for op in ops))
        if not options:
            return None
        stages[tile] = min(options, key=lambda s: sum(CALLS[op] * times[(op, in_flight, s)] for op in ops))
        total += sum(CALLS[op] * times[(op, in_flight, stages[tile])] for op in ops)
    return total, stages


def main():
    out, *paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    min_ms = float(next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--min_ms=")), 2))
    times = read(paths)
    current = (getattr(tg.MMA_IN_FLIGHT, "value", tg.MMA_IN_FLIGHT),
               {tile: getattr(tg, tile).stages for tile in dict.fromkeys(TILES.values())})
    try:
        now = sum(CALLS[op] * times[(op, current[0], current[1][TILES[op]])] for op in CALLS)
    except KeyError as e:
        sys.exit(f"train_gpt.py's own settings were not timed: {e}")
    print(f"train_gpt.py's settings, {current[0]} in flight, stages {current[1]}: {now:.2f} ms a step")
    best = None
    for in_flight in sorted({f for (_, f, _) in times}):
        if found := best_stages(times, in_flight):
            print(f"{in_flight} in flight, stages {found[1]}: {found[0]:.2f} ms a step")
            if best is None or found[0] < best[0]:
                best = (found[0], in_flight, found[1])
    total, in_flight, stages = best
    print(f"best: {in_flight} in flight, stages {stages}: {now - total:.2f} ms a step less")
    source = (Path(tg.__file__).read_text()
              .replace(f"MMA_IN_FLIGHT = gl.constexpr({current[0]})", f"MMA_IN_FLIGHT = gl.constexpr({in_flight})"))
    for tile, n in stages.items():
        source, found = re.subn(rf"^({tile} = Tile\(.*stages=)\d+\)", rf"\g<1>{n})", source, flags=re.M)
        assert found == 1, tile
    Path(out).write_text(source)
    sys.exit(0 if now - total >= min_ms and (in_flight, stages) != current else 3)


if __name__ == "__main__":
    main()
