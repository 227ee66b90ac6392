"""tools/profile_summary.py: kernels fall in the right categories (train_gpt's own Triton kernels by name, the
fused MLP's and the attention inputs' among them), phase spans and non-kernel rows are kept out of the sums, and
the step time comes from the log's profiled steps. A missing log, or a log without its .profile.tsv, exits 2 with
one line on stderr instead of a traceback. Files are written under tmp_path only."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import profile_summary  # noqa: E402
from profile_summary import category  # noqa: E402


@pytest.mark.parametrize("name, expected", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "matmul, bf16"),
    ("nvjet_sm90_qqtst_192x192_128x4_2x1_v_bz_coopB_TNN", "matmul, FP8 (lm_head)"),
    ("nvjet_sm90_rqsss_144x128_128x6_1x2_h_bz_coopA_algo2_TNN", "matmul, FP8 (lm_head)"),
    ("triton_tem_fused_flex_attention_backward_transpose_view_7", "attention (FlexAttention)"),
    ("_window_attention_grad_kv_kernel", "attention (Triton)"),
    ("_attention_delta_kernel", "attention (Triton)"),
    ("triton_red_fused__to_copy_arange_div_eq_exp_log_mul_rsub_sigmoid_sub_sum_unsqueeze_where_3",
     "lm_head loss: soft cap, cross entropy, FP8 casts"),
    ("_logit_grad_kernel", "lm_head loss: soft cap, cross entropy, FP8 casts"),
    ("_lse_of_sums_kernel", "lm_head loss: soft cap, cross entropy, FP8 casts"),
    ("_logits_kernel", "matmul, FP8 (lm_head)"),  # its epilogue sums the rows too
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
     "at::native::float8_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda(c10::Float8_e4m3fn)#1}>",
     "lm_head loss: soft cap, cross entropy, FP8 casts"),
    ("triton_poi_fused__unsafe_view_pow_relu_15", "ReLU^2"),
    ("_matmul_relu2_kernel", "MLP matmuls with ReLU^2 (Gluon)"),  # train_gpt's fused MLP, not "other"
    ("_qkv_prep_grad_kernel", "RMS norms, rotary, residuals"),
    ("_qkv_matmul_prep_kernel", "qkv matmul with its prep (Gluon)"),  # a matmul first: not the norms
    ("_matmul_residual_kernel", "output projection with the residual (Gluon)"),  # not the MLP's, nor cuBLAS's
    ("triton_per_fused__fused_rms_norm__fused_rms_norm_backward_add_matmul_relu2_grad_mul_select_view_8",
     "RMS norms, rotary, residuals"),  # a norm's backward, named after the fused MLP's op beside it
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", profile_summary.COMMUNICATION),
    ("nccl:all_reduce", None),
    ("forward_backward", None),
])
def test_category(name, expected):
    assert category(name) == expected


def write_profiled_run(tmp_path):
    """A log of 20 steps whose steps 11..12 were profiled, and its profile beside it."""
    log = tmp_path / "run.txt"
    log.write_text("step:10/20 train_loss:4.0 train_time:1000ms step_avg:100.00ms\n"
                   "step:11/20 train_loss:4.0 train_time:1110ms step_avg:100.91ms\n"
                   "step:12/20 train_loss:4.0 train_time:1230ms step_avg:102.50ms\n"
                   "profile of steps 11..12: run.profile.tsv\n")
    log.with_suffix(".profile.tsv").write_text(
        "# 2 steps profiled; per step: self device us, self cpu us, calls, name\n"
        "100000.0\t0.0\t1\tforward_backward\n"
        "60000.0\t50.0\t4\taten::mm\n"  # an op: its kernels are counted below
        "60000.0\t0.0\t4\tnvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_TNT\n"
        "30000.0\t0.0\t2\ttriton_poi_fused__unsafe_view_pow_relu_15\n"
        "10000.0\t0.0\t48\t_matmul_relu2_kernel\n"
        "8000.0\t0.0\t2\tncclDevKernel_AllReduce_Sum_f32_RING_LL(x)\n")
    return log


def test_summary(tmp_path):
    text = profile_summary.summary(write_profiled_run(tmp_path))
    assert text.startswith("measured step (profiled): 115.0 ms")
    assert "| matmul, bf16 | 60.0 | 52% |" in text and "| ReLU^2 | 30.0 | 26% |" in text
    assert "| MLP matmuls with ReLU^2 (Gluon) | 10.0 | 9% |" in text
    assert "| not covered by a compute kernel | 15.0 | 13% |" in text  # NCCL overlaps: not subtracted
    assert "forward_backward 100.0 ms" in text


def test_missing_log_or_profile_is_one_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "none.txt"
    assert profile_summary.main([str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"error: no log at {missing}\n"

    log = write_profiled_run(tmp_path)
    tsv = log.with_suffix(".profile.tsv")
    tsv.rename(tmp_path / "elsewhere.tsv")
    assert profile_summary.main([str(log)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and str(tsv) in err and "--profile_at=N" in err

    (tmp_path / "elsewhere.tsv").rename(tsv)
    assert profile_summary.main([str(log)]) == 0
    assert capsys.readouterr().out.startswith("measured step (profiled): 115.0 ms")
