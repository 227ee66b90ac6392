"""Where train_gpt.py's Gluon matmuls lose time against cuBLAS, at the model's shapes, on one Hopper GPU.

For the MLP's up-projection (forward), its backward (grad_y against w_proj stored (K, N)), the qkv projection,
one chunk of the head's FP8 logits and the attention's output projection with the residual, each timed as:
- cuBLAS's matmul alone, bf16 out (torch.mm, or torch._scaled_mm for FP8);
- train_gpt.py's op (the matmul with its epilogue: ReLU^2, its gradient from h, QK norm, rotary and the value mix
  with a value embedding, the logits' row sums, the residual add and its squares' sums; row scales of 1 where the
  op takes them);
- train_gpt.py's ping-pong kernel (its loading warp, buffers and matmul loop, imported from train_gpt.py; the
  MLP's, the qkv matmul's and the logits') at 128 x 128 tiles, with another
  epilogue: "matmul only" stores a row sum of the float32 accumulator, 128 floats a tile; "bf16 store" rounds the
  tile to bf16 and stores it through the TMA, as cuBLAS does; for the logits, "row sums only" computes the
  production epilogue's sums of exp(z) without storing the logits.
"matmul only" against cuBLAS says whether the ping-pong matmul loop itself is slower; the epilogues add from there.
With --tiles= (rows x columns x depth x stages, comma separated), "matmul only" also at each of those tiles.
With --busy=n,..., "bf16 store" also after n passes over its accumulator before its store, each pass of each
kind in --busy_ops (default mul): mul multiplies every element by 1.0 (128 FMULs a thread), sqrt takes its root
(128 special-function instructions), round rounds it to bf16 and back as the epilogues do (64 packed conversions,
128 unpacking instructions). Where the other warpgroup's matmul hides an epilogue, the time stays flat as n grows
until the epilogue outlasts that matmul; where it does not, each pass adds its instructions' time a tile.
With --op_stages=n,..., train_gpt's op also with n stages in its ring (its tile otherwise as it is). With
--only=text, only the cases whose name holds text (e.g. --only=MLP).

Each time is the median over 20 rounds of 10 calls queued back to back, per call (matmul_peak.median_ms).

Usage: python benchmarks/gluon_matmul_diag.py [--tiles=128x128x64x5,128x128x128x3] [--busy=4,8,16,32]
                                              [--busy_ops=mul,sqrt,round] [--op_stages=3,5] [--only=MLP]
"""
import inspect
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import train_gpt as tg  # noqa: E402
from train_gpt import (_bf16, _exp_softcap_kernel, _f32_of_bf16, _gluon_tiles, _matmul_buffers,  # noqa: E402
                       _matmul_loads, _matmul_tile, _tile_at, _tma_store, fence_async_shared, gl, gluon, tma)

MATMUL_ONLY, BF16_STORE, ROW_SUMS_ONLY = 0, 1, 2
PING_PONG_BF16 = tg.Tile((128, 128, 64), warps=4, stages=4)  # the MLP's and the qkv matmul's ping-pong tile
PING_PONG_FP8 = tg.Tile((128, 128, 128), warps=4, stages=4)  # the logits'
EPILOGUES = {MATMUL_ONLY: "matmul only", BF16_STORE: "bf16 store", ROW_SUMS_ONLY: "row sums only"}
BUSY_OPS = ("mul", "sqrt", "round")


@gluon.jit
def _diag_kernel(x_desc, w_desc, out_desc, sums, M, N, K, busy, one, SCALE: gl.constexpr, CAP: gl.constexpr,
                 TEMPERATURE: gl.constexpr, EPILOGUE: gl.constexpr, BUSY_OP: gl.constexpr, W_KN: gl.constexpr,
                 N_MAJOR: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                 INSTR_K: gl.constexpr):
    # train_gpt's ping-pong kernel (the MLP's, qkv's and logits'), with _diag_consumer's epilogues
    x_bufs, w_bufs, ready, empty, out_bufs, turn = _matmul_buffers(x_desc, w_desc, out_desc, STAGES)
    gl.warp_specialize([
        (_diag_consumer, (out_desc, sums, x_bufs, w_bufs, ready, empty, out_bufs, turn, M, N, K, busy, one, SCALE,
                          CAP, TEMPERATURE, EPILOGUE, BUSY_OP, W_KN, N_MAJOR, BM, BN, BK, STAGES, INSTR_K, 0)),
        (_diag_consumer, (out_desc, sums, x_bufs, w_bufs, ready, empty, out_bufs, turn, M, N, K, busy, one, SCALE,
                          CAP, TEMPERATURE, EPILOGUE, BUSY_OP, W_KN, N_MAJOR, BM, BN, BK, STAGES, INSTR_K, 1)),
        (_matmul_loads, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, N, K, W_KN, N_MAJOR, BM, BN, BK, STAGES)),
    ], [4, 1], [240, 24])


@gluon.jit
def _diag_consumer(out_desc, sums, x_bufs, w_bufs, ready, empty, out_bufs, turn, M, N, K, busy, one,
                   SCALE: gl.constexpr, CAP: gl.constexpr, TEMPERATURE: gl.constexpr, EPILOGUE: gl.constexpr,
                   BUSY_OP: gl.constexpr, W_KN: gl.constexpr, N_MAJOR: gl.constexpr, BM: gl.constexpr,
                   BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr, INSTR_K: gl.constexpr,
                   WHICH: gl.constexpr):
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                     instr_shape=[16, BN, INSTR_K])
    k_steps = (K + BK - 1) // BK
    count = WHICH * k_steps
    out_tile, phase = out_bufs.index(WHICH), 0
    tile_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    for tile in range(gl.program_id(0) + WHICH * gl.num_programs(0), (M + BM - 1) // BM * ((N + BN - 1) // BN),
                      2 * gl.num_programs(0)):
        off_m, off_n = _tile_at(tile, M, N, BM, BN, N_MAJOR)
        tma.store_wait(0)
        acc, count = _matmul_tile(x_bufs, w_bufs, ready, empty, turn, count, phase, k_steps, layout, W_KN, BM, BN,
                                  STAGES, WHICH)
        if EPILOGUE == 1:
            for _ in range(busy):  # one is 1.0 at run time: the compiler cannot drop the passes
                if BUSY_OP == 0:
                    acc = acc * one
                elif BUSY_OP == 1:
                    acc = gl.sqrt(gl.abs(acc)) * one
                else:
                    acc = _f32_of_bf16(_bf16(acc * one))
            out_tile.store(acc.to(gl.bfloat16))
            fence_async_shared()
            _tma_store(out_desc, [off_m, off_n], out_tile)
        else:
            if EPILOGUE == 2:
                acc = _exp_softcap_kernel(_f32_of_bf16(_bf16(acc * SCALE)), CAP, TEMPERATURE)
            rows = off_m + tile_rows
            gl.store(sums + off_n // BN * M + rows, gl.sum(acc, axis=1), mask=rows < M)
        phase ^= 1
    tma.store_wait(0)


def diag_matmul(x: torch.Tensor, w: torch.Tensor, epilogue: int, w_kn: bool, n_major: bool,
                tile: tg.Tile, busy: int = 0, busy_op: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ w.T (or x @ w, w_kn) by _diag_kernel -> (the bf16 product, its rows' sums by column block (N / BN, M)):
    the product only with the bf16 store (else an empty BM x BN tile), the sums only without it; the bf16 store
    after `busy` passes of BUSY_OPS[busy_op] over the accumulator."""
    (BM, BN, BK), warps, stages = tile
    M, K = x.shape
    N = w.size(1) if w_kn else w.size(0)
    out = x.new_empty((M, N) if epilogue == BF16_STORE else (BM, BN), dtype=torch.bfloat16)
    sums = x.new_empty((-(-N // BN), M), dtype=torch.float32)
    fp8 = x.dtype == torch.float8_e4m3fn
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(num_sms, -(-M // BM) * -(-N // BN)),)
    _diag_kernel[grid](_gluon_tiles(x, [BM, BK]), _gluon_tiles(w, [BK, BN] if w_kn else [BN, BK]),
                       _gluon_tiles(out, [BM, BN]), sums, M, N, K, busy, 1.0, 1 / (tg.FP8_X_SCALE * tg.FP8_W_SCALE),
                       tg.SOFTCAP, tg.SOFTCAP_TEMPERATURE, epilogue, busy_op, w_kn, n_major, BM, BN, BK, stages,
                       32 if fp8 else 16, num_warps=warps, maxnreg=168)
    return out, sums


def parse_tiles(arg: str) -> list[tg.Tile]:
    tiles = []
    for spec in filter(None, arg.split(",")):
        bm, bn, bk, stages = (int(v) for v in spec.split("x"))
        tiles.append(tg.Tile((bm, bn, bk), warps=4, stages=stages))
    return tiles


def op_cases() -> list[tuple]:
    """train_gpt's ping-pong ops at a 1-GPU sequence's shapes (64K tokens, a head chunk), each with its
    inputs, tiles, a cuBLAS call of the same product, a call of the op and the epilogues to time beside it."""
    T, D, H, n, V = 64 * 1024, 768, 4 * 768, tg.HEAD_CHUNK, 50304
    x, grad_y = torch.randn(T, D, device="cuda").bfloat16(), torch.randn(T, D, device="cuda").bfloat16()
    w_fc = (torch.randn(H, D, device="cuda") * D**-0.5).bfloat16()
    w_proj = (torch.randn(D, H, device="cuda") * H**-0.5).bfloat16()
    # since round 29 the MLP's ops take the rows' scales last, and the qkv matmul's after x: ones here
    takes_scales = len(inspect.signature(tg._matmul_relu2_cuda).parameters) == 3
    scale = (torch.ones(T, 1, device="cuda"),) if takes_scales else ()
    w_qkv = (torch.randn(3 * D, D, device="cuda") * D**-0.5).bfloat16()
    ve, rotary = torch.randn(T, D, device="cuda").bfloat16(), tg.Rotary(128, T).cuda()
    lambdas = torch.tensor([0.7, 0.4], device="cuda")
    qkv_args = (x[None], *(s[None] for s in scale), w_qkv, ve, lambdas, rotary.cos, rotary.sin)
    h = tg._matmul_relu2_cuda(x, w_fc, *scale)
    x_q = tg._e4m3(torch.randn(n, D, device="cuda"), tg.FP8_X_SCALE)
    w_q = tg._e4m3(torch.randn(V, D, device="cuda") * 0.05, tg.FP8_W_SCALE)
    one = torch.ones((), device="cuda")
    cases = [  # name, x, w, w_kn, n_major, the op's tile's name, the ping-pong's, cuBLAS, train_gpt's op, epilogues
        ("MLP forward", x, w_fc, False, False, "MLP_MATMUL", PING_PONG_BF16, lambda: x @ w_fc.T,
         lambda: tg._matmul_relu2_cuda(x, w_fc, *scale), (MATMUL_ONLY, BF16_STORE)),
        ("MLP backward", grad_y, w_proj, True, False, "MLP_MATMUL", PING_PONG_BF16, lambda: grad_y @ w_proj,
         lambda: tg._matmul_relu2_grad_cuda(grad_y, w_proj, h, *scale), (MATMUL_ONLY, BF16_STORE)),
        ("qkv matmul with its prep", x, w_qkv, False, False, "QKV_MATMUL", PING_PONG_BF16, lambda: x @ w_qkv.T,
         lambda: tg._qkv_matmul_prep_gluon(*qkv_args), (MATMUL_ONLY, BF16_STORE)),
        ("FP8 logits, a chunk", x_q, w_q, False, True, "HEAD_MATMUL", PING_PONG_FP8,
         lambda: torch._scaled_mm(x_q, w_q.T, out_dtype=torch.bfloat16, scale_a=one / tg.FP8_X_SCALE,
                                  scale_b=one / tg.FP8_W_SCALE, use_fast_accum=True),
         lambda: tg._logits_gluon(x_q, w_q), (MATMUL_ONLY, BF16_STORE, ROW_SUMS_ONLY)),
    ]
    if hasattr(tg, "_matmul_residual_gluon"):  # the attention's output projection since round 44
        w_o = (torch.randn(D, D, device="cuda") * D**-0.5).bfloat16()
        cases.append(("output projection with the residual", x, w_o, False, False, "RESIDUAL_MATMUL", PING_PONG_BF16,
                      lambda: x @ w_o.T, lambda: tg._matmul_residual_gluon(x, w_o, grad_y), (MATMUL_ONLY, BF16_STORE)))
    return cases


def main():
    from matmul_peak import median_ms

    def option(name: str) -> str:
        return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")), "")
    tiles = parse_tiles(option("tiles"))
    busy = [int(n) for n in filter(None, option("busy").split(","))]
    busy_ops = [BUSY_OPS.index(op) for op in (option("busy_ops") or "mul").split(",")]
    op_stages = [int(n) for n in filter(None, option("op_stages").split(","))]
    torch.manual_seed(0)
    cases = op_cases()
    print(f"{torch.cuda.get_device_name()}, torch {torch.version.__version__}; ms a call (TFLOP/s)")
    for name, a, b, w_kn, n_major, op_tile, tile, cublas, op, epilogues in cases:
        if option("only") not in name:
            continue
        flops = 2 * a.size(0) * a.size(1) * (b.size(1) if w_kn else b.size(0))

        def line(label: str, fn) -> str:
            ms = median_ms(fn, reps=20, calls=10)
            return f"  {label:<34} {ms:7.3f} ms ({flops / ms / 1e9:5.0f})"
        print(f"{name}: {a.size(0)} x {a.size(1)} @ {'w' if w_kn else 'w.T'}, {tuple(b.shape)} {b.dtype}")
        print(line("cuBLAS", cublas))
        print(line(f"train_gpt's op, {tile_name(getattr(tg, op_tile))}", op))
        for stages in op_stages:
            saved = getattr(tg, op_tile)
            setattr(tg, op_tile, saved._replace(stages=stages))
            try:
                print(line(f"train_gpt's op, {tile_name(getattr(tg, op_tile))}", op))
            except Exception as e:  # e.g. out of shared memory: say so and go on
                print(f"  train_gpt's op, {stages} stages: {type(e).__name__}: {str(e).splitlines()[0][:100]}")
            finally:
                setattr(tg, op_tile, saved)
        # the bf16 store's product against cuBLAS's, which _scaled_mm scales: a broken variant shows, not a test
        unscale = 1 / (tg.FP8_X_SCALE * tg.FP8_W_SCALE) if a.dtype == torch.float8_e4m3fn else 1.0
        expected = cublas().float()
        for epilogue in epilogues:
            check = ""
            if epilogue == BF16_STORE:
                got = diag_matmul(a, b, epilogue, w_kn, n_major, tile)[0].float() * unscale
                check = f"  max |diff| from cuBLAS {(got - expected).abs().max().item():.2e}"
            print(line(f"{EPILOGUES[epilogue]}, {tile_name(tile)}",
                       lambda: diag_matmul(a, b, epilogue, w_kn, n_major, tile)) + check)
            for kind, n in itertools.product(busy_ops, busy) if epilogue == BF16_STORE else ():
                print(line(f"bf16 store after {n} {BUSY_OPS[kind]}, {tile_name(tile)}",
                           lambda: diag_matmul(a, b, epilogue, w_kn, n_major, tile, n, kind)))
        for other in tiles:
            try:
                print(line(f"matmul only, {tile_name(other)}", lambda: diag_matmul(a, b, MATMUL_ONLY, w_kn, n_major,
                                                                                      other)))
            except Exception as e:  # e.g. out of shared memory: say so and go on
                print(f"  matmul only, {tile_name(other)}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")


def tile_name(tile: tg.Tile) -> str:
    (bm, bn, bk), _, stages = tile
    return f"{bm}x{bn}x{bk}x{stages}"


if __name__ == "__main__":
    main()
