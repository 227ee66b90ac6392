"""The fused MLP's backward kernel, which now takes a square root per value in its epilogue, at other pipeline
settings: each variant is this repository's train_gpt.py with the backward's stage count and tile-loop flattening
changed, timed in a process of its own (the ops' names are global) with benchmarks/mlp_epilogue_bench.py's timer.
Written for ac2868d's train_gpt.py, whose backward settings it replaces (the next commit took one of them):
    git checkout ac2868d && python3 records/2026-12-04_mlp_relu_from_h_x1/mlp_backward_variants.py"""
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = (REPO / "train_gpt.py").read_text()
STAGES = "num_stages=4 if backward else 3"
FLATTEN = "flatten=not BACKWARD"
TIMER = f"""
import sys
sys.path[:0] = [sys.argv[1], {str(REPO / 'benchmarks')!r}]
import torch
from matmul_peak import median_ms
from train_gpt import matmul_relu2, matmul_relu2_grad
gen = torch.Generator(device="cuda").manual_seed(0)
T, D, H = 64 * 1024, 768, 4 * 768
x = torch.randn(T, D, device="cuda", generator=gen).bfloat16()
grad_y = (1e-3 * torch.randn(T, D, device="cuda", generator=gen)).bfloat16()
w_fc = (0.02 * torch.randn(H, D, device="cuda", generator=gen)).bfloat16()
w_proj = (0.02 * torch.randn(D, H, device="cuda", generator=gen)).bfloat16()
h = matmul_relu2(x, w_fc)
digest = matmul_relu2_grad(grad_y, w_proj, h).float().sum().item()
print(f"{{median_ms(lambda: matmul_relu2_grad(grad_y, w_proj, h), reps=10, calls=20):.3f}} ms  sum {{digest:.6e}}")
"""


def main():
    assert SOURCE.count(STAGES) == 1 and SOURCE.count(FLATTEN) == 1
    variants = {"committed: 4 stages, not flattened": SOURCE}
    for stages, flatten in [(3, False), (5, False), (3, True), (4, True)]:
        name = f"{stages} stages, {'flattened' if flatten else 'not flattened'}"
        variants[name] = SOURCE.replace(STAGES, f"num_stages={stages} if backward else 3").replace(
            FLATTEN, f"flatten={flatten} if BACKWARD else True")
    for turn in (1, 2):
        for name, source in variants.items():
            with tempfile.TemporaryDirectory() as folder:
                (Path(folder) / "train_gpt.py").write_text(source)
                run = subprocess.run([sys.executable, "-c", TIMER, folder], capture_output=True, text=True)
                result = run.stdout.strip() or run.stderr.strip().splitlines()[-1][:150]
                print(f"turn {turn}, backward {name:36s}: {result}", flush=True)


if __name__ == "__main__":
    main()
