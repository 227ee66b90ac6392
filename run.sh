#!/usr/bin/env bash
# The speedrun on every GPU of this machine:   ./run.sh [--name=value ...]
#   NPROC=4 ./run.sh          use 4 GPUs (default: all); fewer GPUs accumulate gradients, same math
#   DATA=synthetic ./run.sh   train on generated shards (benchmarks on machines without network)
# Without a CUDA GPU it runs the smoke preset on the CPU instead: a tiny model on generated data, not the speedrun.
# Installs nothing: pip install -r requirements.txt first.
set -euo pipefail
cd "$(dirname "$0")"

if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "run.sh: no CUDA GPU here, so this is a SMOKE RUN on the CPU (tiny model, generated data), not the speedrun."
    exec python3 -m torch.distributed.run --standalone --nproc_per_node="${NPROC:-2}" train_gpt.py --preset=smoke "$@"
fi

NPROC=${NPROC:-$(python3 -c "import torch; print(torch.cuda.device_count())")}
if [ "${DATA:-fineweb}" = synthetic ]; then
    python3 data/synthetic.py --out data/synthetic --train_shards 8 --tokens 100000000
    set -- "--train_files=data/synthetic/fineweb_train_*.bin" "--val_files=data/synthetic/fineweb_val_*.bin" "$@"
else
    python3 data/cached_fineweb10B.py "${SHARDS:-8}"  # skips the shards already there
fi
exec python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" train_gpt.py "$@"
