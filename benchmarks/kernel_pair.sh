#!/usr/bin/env bash
# The GPU kernels of two versions side by side on this machine's first GPU, in one go: the new version's GPU tests,
# then benchmarks/gluon_matmul_diag.py and benchmarks/head_loss_bench.py (this checkout's) on each version's
# train_gpt.py, old first. OLD and NEW are folders that hold a version's tree, e.g. from
# `git archive REV | tar -x -C DIR`; each gets this checkout's two benchmarks and the timer they import.
#   benchmarks/kernel_pair.sh OLD NEW [head_loss_bench.py's options, e.g. --sums_in_matmul=1 --chunks=8192,16384]
# (--sums_in_matmul=1: the head as it trains on Hopper, with the Gluon logits kernel)
# Prints each part's output under a header; a failing part is said and the rest still runs.
set -uo pipefail
old=$1 new=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
for dir in "$old" "$new"; do
    mkdir -p "$dir/benchmarks"
    cp "$here/gluon_matmul_diag.py" "$here/head_loss_bench.py" "$here/matmul_peak.py" "$dir/benchmarks/"
done
echo "=== GPU tests of $new"
(cd "$new" && python3 -m pytest -q -p no:cacheprovider tests/test_attention.py tests/test_attention_inputs.py \
    tests/test_fused_mlp.py tests/test_head_loss.py $(ls tests/test_embedding.py 2>/dev/null)) \
    || echo "=== the GPU tests of $new failed"
for dir in "$old" "$new"; do
    echo "=== benchmarks/gluon_matmul_diag.py on $dir"
    (cd "$dir" && python3 benchmarks/gluon_matmul_diag.py) || echo "=== gluon_matmul_diag.py failed on $dir"
    echo "=== benchmarks/head_loss_bench.py on $dir $*"
    (cd "$dir" && python3 benchmarks/head_loss_bench.py train_gpt.py "$@") \
        || echo "=== head_loss_bench.py failed on $dir"
done
