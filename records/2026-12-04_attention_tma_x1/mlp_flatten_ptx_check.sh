# The MLP kernel's FLATTEN switch derived from BACKWARD (no longer an argument): does Triton build the same kernel?
# Runs the fused MLP's forward and backward once with b082346's train_gpt.py and once with the working tree's, each with
# its own Triton cache, then compares the kernels' PTX (less line info and debug sections) and the outputs. Run from the
# repository's root on a Hopper GPU: bash records/2026-12-04_attention_tma_x1/mlp_flatten_ptx_check.sh
set -x; mkdir -p /tmp/old; git show b082346:train_gpt.py > /tmp/old/train_gpt.py
for v in old new; do p=$([ $v = old ] && echo /tmp/old || echo $PWD)
TRITON_CACHE_DIR=/tmp/c_$v python3 -c "
import sys; sys.path.insert(0, '$p'); import torch, train_gpt as tg
g = torch.Generator(device='cuda').manual_seed(0)
x, w, gy = (torch.randn(*s, device='cuda', generator=g).bfloat16() for s in ((65536, 768), (3072, 768), (65536, 768)))
a, h = tg.matmul_relu2(x, w); ga = tg.matmul_relu2_grad(gy, w.T.contiguous(), a)
torch.save([a.cpu(), h.cpu(), ga.cpu()], '/tmp/out_$v.pt')"
for f in $(find /tmp/c_$v -name '_matmul_relu2_kernel.ptx'); do sed '/\.section\s*\.debug/,$d' $f | grep -v '^\s*\.loc\|^\s*\.file' > $f.strip; echo "$(md5sum < $f.strip) $f"; done | sort > /tmp/ptx_$v.txt; done
for v in old new; do for f in $(find /tmp/c_$v -name '*.strip'); do echo "$f $(wc -l < $f) lines $(md5sum < $f)"; done; done
a=$(find /tmp/c_old -name '*.strip' | head -1); for f in $(find /tmp/c_new -name '*.strip'); do diff $a $f | head -20; done
echo PTX old; cat /tmp/ptx_old.txt; echo PTX new; cat /tmp/ptx_new.txt; cmp /tmp/ptx_old.txt /tmp/ptx_new.txt && echo "PTX identical"
python3 -c "
import torch; o, n = torch.load('/tmp/out_old.pt'), torch.load('/tmp/out_new.pt'); print('outputs equal:', [torch.equal(a, b) for a, b in zip(o, n)])"
python3 -m pytest -q tests/test_fused_mlp.py 2>&1 | tail -3
