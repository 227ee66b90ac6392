#!/usr/bin/env bash
# One run of a train_gpt.py on this machine's GPUs with an empty compile cache, on synthetic shards: half of a
# side-by-side pair as records/ makes them. Run the old and the new script one after the other on one machine.
#   benchmarks/cold_run.sh SCRIPT TAG [--name=value ...]      e.g. SCRIPT=old.py from `git show REV:train_gpt.py`
# NPROC (default: every GPU) and SHARDS (train shards to generate, default 8) are read from the environment; with
# SMI_LOG=FILE, nvidia-smi writes the GPUs' SM clock, power and power-cap state to FILE every 50 ms of the run.
set -euo pipefail
script=$1 tag=$2
shift 2
python3 data/synthetic.py --out data/synthetic --train_shards "${SHARDS:-8}" --tokens 100000000 >&2
cache=$(mktemp -d)
export TORCHINDUCTOR_CACHE_DIR=$cache/inductor TRITON_CACHE_DIR=$cache/triton
if [[ -n "${SMI_LOG:-}" ]]; then
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,power.draw,clocks_event_reasons.sw_power_cap \
        --format=csv,noheader,nounits -lms 50 > "$SMI_LOG" &
    smi=$!
    trap 'kill "$smi"' EXIT
fi
torchrun --standalone --nproc_per_node="${NPROC:-$(nvidia-smi -L | wc -l)}" "$script" --tag="$tag" \
    --train_files='data/synthetic/fineweb_train_*.bin' --val_files='data/synthetic/fineweb_val_*.bin' "$@"
rm -rf "$cache"
