#!/usr/bin/env bash
# The speedrun on every GPU of this machine:   ./run.sh [--name=value ...]
#   NPROC=4 ./run.sh          use 4 GPUs (default: all); fewer GPUs accumulate gradients, same math
#   DATA=synthetic ./run.sh   train on generated shards (benchmarks on machines without network)
# Without a CUDA GPU it runs the smoke preset on the CPU instead: a tiny model on generated data, not the speedrun.
# The command line, the configuration and the data are checked in one process before torchrun starts; an error is
# one line and exit code 2. Installs nothing: pip install -r requirements.txt first.
set -euo pipefail
cd "$(dirname "$0")"
for arg in "$@"; do
    case $arg in -h | --help) exec python3 train_gpt.py --help ;; esac
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # torchrun's value for several processes, set here to spare its notice
if [[ -n ${NPROC:-} && ! $NPROC =~ ^[1-9][0-9]*$ ]]; then
    echo "error: NPROC=$NPROC: must be a positive integer (the number of processes)" >&2
    exit 2
fi

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" != 0 ] && [ "${NPROC:-$gpus}" -gt "$gpus" ]; then
    echo "error: NPROC=$NPROC: must be at most the number of CUDA GPUs here, $gpus" >&2
    exit 2
fi
if [ "$gpus" = 0 ]; then
    set -- --preset=smoke "$@"
    NPROC=${NPROC:-2}
elif [ "${DATA:-fineweb}" = synthetic ]; then
    python3 data/synthetic.py --out data/synthetic --train_shards 8 --tokens 100000000
    set -- "--train_files=data/synthetic/fineweb_train_*.bin" "--val_files=data/synthetic/fineweb_val_*.bin" "$@"
else
    python3 data/cached_fineweb10B.py "${SHARDS:-8}" >/dev/null  # skips the shards already there; progress on stderr
fi
NPROC=${NPROC:-$gpus}
python3 train_gpt.py --check="$NPROC" "$@"
if [ "$gpus" = 0 ]; then
    echo "run.sh: no CUDA GPU here, so this is a SMOKE RUN on the CPU (tiny model, generated data), not the speedrun."
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_gpt.py "$@"
