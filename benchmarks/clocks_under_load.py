import subprocess, sys, time, torch
sys.path.insert(0, "benchmarks")  # run from the repository root
import gluon_matmul_diag as gd
tg = gd.tg
smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,power.limit,temperature.gpu,"
                        "clocks_event_reasons.sw_power_cap,clocks_event_reasons.hw_slowdown,clocks_event_reasons.sw_thermal_slowdown",
                        "--format=csv,noheader,nounits", "-lms", "50"], stdout=open("/tmp/smi.csv", "w"))
T, D, H = 64 * 1024, 768, 3072
x = torch.randn(T, D, device="cuda").bfloat16()
w = (torch.randn(H, D, device="cuda") * D**-0.5).bfloat16()
s = torch.ones(T, 1, device="cuda")
tile = gd.PING_PONG_BF16
cases = [("cublas", lambda: x @ w.T), ("op", lambda: tg._matmul_relu2_cuda(x, w, s)),
         ("store", lambda: gd.diag_matmul(x, w, gd.BF16_STORE, False, False, tile)),
         ("store+16mul", lambda: gd.diag_matmul(x, w, gd.BF16_STORE, False, False, tile, 16, 0)),
         ("store+4sqrt", lambda: gd.diag_matmul(x, w, gd.BF16_STORE, False, False, tile, 4, 1)),
         ("idle", None)]
for _, fn in cases:
    if fn: fn()
torch.cuda.synchronize(); time.sleep(1)
for name, fn in cases * 2:
    t0 = time.time(); n = 0
    if fn is None:
        time.sleep(2); print(name, t0, time.time(), flush=True); continue
    e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
    e0.record()
    while time.time() - t0 < 3:
        for _ in range(50): fn()
        n += 50
        torch.cuda.synchronize()
    e1.record(); torch.cuda.synchronize()
    print(name, t0, time.time(), f"{e0.elapsed_time(e1) / n:.4f} ms", flush=True)
time.sleep(0.3); smi.terminate(); smi.wait()
