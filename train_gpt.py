"""GPT-2 small on FineWeb to val loss <= 3.28 in 1393 steps: the NanoGPT speedrun "sub-3 minute" record.

Launch (one node, any of 1, 2, 4 or 8 GPUs; fewer GPUs accumulate gradients and compute the same thing):
    python data/cached_fineweb10B.py 8
    torchrun --standalone --nproc_per_node=8 train_gpt.py
    torchrun --standalone --nproc_per_node=2 train_gpt.py --preset=smoke   # tiny CPU run, makes its own data
    python train_gpt.py --check=8 [--name=value ...]   # check the setup for 8 processes and the data; exit
Every hyperparameter below can be set as --name=value. The log goes to records/<tag>/<run id>.txt.

Target: the record's mean val_loss of 3.2787 <= 3.28 at step 1393, 179.8 s of training on 8 x H100. This file has
not yet been run on FineWeb: its GPU runs so far trained on synthetic shards (README.md says what was measured).

The system is the record of 2025-01-16 by the speedrun community (github.com/KellerJordan/modded-nanogpt):
Muon (Keller Jordan), U-Net skips and value embeddings, FlexAttention with document-causal block-wise
sliding windows (long/short by @leloykun and @YouJiacheng), FP8 lm_head, ReLU^2 MLP, QK norm, soft-capped
logits. Credits for single tricks are in the comments where they are used. This file is our own rewrite.

It reads top to bottom: hyperparameters, the model, the attention masks, Muon, the data, the training steps and
main(); then what goes on around a run (the command line, launch checks, smoke data, checkpoints, profiles); then
the ops that have GPU kernels. The model calls ops by name (attention_masks, attention_block: the qkv matmul,
attention_inputs then attention, residual_projection, relu2_mlp, head_loss); bind_ops() binds each of these
seven, once a run, to its implementation, whose plain-PyTorch reference is what the CPU runs and what the tests
compare the kernels with.
"""
import copy
import ctypes
import dataclasses
import difflib
import glob
import hashlib
import importlib.util
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable, NamedTuple

if __name__ == "__main__":
    # A SIGINT or SIGTERM during the imports below, which take seconds, exits without their traceback; main() then
    # installs the run's own handlers (Stops). A signal the process was started ignoring stays ignored.
    def exit_before_start(signum: int, frame):
        if os.environ.get("RANK", "0") == "0":
            print("interrupted before the run started", flush=True)
        sys.exit(128 + signum)

    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(stop_signal) is not signal.SIG_IGN:
            signal.signal(stop_signal, exit_before_start)

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):
    # Answered before the imports below, which take seconds: the launch lines above and the Hyperparameters
    # fields, read from this file. Under torchrun, rank 0 alone prints.
    if os.environ.get("RANK", "0") == "0":
        fields = Path(__file__).read_text().split("class Hyperparameters:\n", 1)[1].split("\n\n\n", 1)[0]
        print(__doc__.split("\n\n")[1] + "\n\nHyperparameters (--name=value), with their defaults:\n" + fields)
    sys.exit(0)

import numpy as np
import torch
import torch._inductor.async_compile
import torch._inductor.config
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.profiler import record_function


class _NoTriton:
    """Stands in for triton, triton.language, Gluon and their names where they are missing, so that the kernels'
    definitions still evaluate: @triton.jit and @gluon.jit leave a kernel a plain function, tl.constexpr(value) the
    value (tests/kernel_emulator.py runs them so on the CPU); bind_ops() binds no op that would launch them."""

    def __getattr__(self, name: str):
        return self

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and not kwargs else self


try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
    HAS_TRITON = True
except ImportError:  # CPU builds of torch come without Triton; only the GPU kernels need it
    HAS_TRITON = False
    triton = tl = TensorDescriptor = _NoTriton()
try:  # Gluon: Triton's language with explicit warps, shared memory and barriers, for the warp-specialised kernels
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    HAS_GLUON = True
except ImportError:
    HAS_GLUON = False
    gluon = gl = fence_async_shared = mbarrier = tma = warpgroup_mma = warpgroup_mma_wait = _NoTriton()
    GluonTensorDescriptor = _NoTriton()


REPO = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------
# Hyperparameters: every field can be set from the command line as --name=value


@dataclass
class Hyperparameters:
    # data
    train_files: str = "data/fineweb10B/fineweb_train_*.bin"  # glob of train shards (relative to the cwd)
    val_files: str = "data/fineweb10B/fineweb_val_*.bin"  # glob of the val shard; the first match is used
    val_tokens: int = 10_485_760  # tokens of the val shard used at every evaluation
    # batch: batch_seqs sequences a step, shared out over the ranks, accumulated within a rank
    batch_seqs: int = 8  # sequences a step (8 x 64K = 524,288 tokens)
    seq_len: int = 64 * 1024  # tokens a sequence, a multiple of 128; also the val sequence length
    # model
    vocab_size: int = 50257  # GPT-2 tokens; the lm_head is padded to a multiple of 128
    num_layers: int = 12
    num_heads: int = 6
    model_dim: int = 768  # head dim = model_dim / num_heads = 128
    # schedule
    num_iterations: int = 1393  # training steps
    cooldown_frac: float = 0.4  # last fraction of the steps in which every lr decays linearly to 0.1x
    window_tokens: int = 1728  # attention window at the end, before rounding up to 128 (-> 1792)
    val_every: int = 125  # steps between evaluations, from step 0 (0: only at the end)
    # optimizers
    muon_lr: float = 0.05  # for the matrices in the blocks
    muon_momentum_start: float = 0.85  # warmed up linearly ...
    muon_momentum_end: float = 0.95  # ... to this ...
    muon_momentum_steps: int = 300  # ... over this many steps
    head_lr: float = 0.008  # Adam, lm_head
    embed_lr: float = 0.6  # Adam, token and value embeddings
    scalar_lr: float = 0.04  # Adam, all scalars (lambdas, skip weights)
    # implementation
    fp8_head: bool = True  # FP8 lm_head matmul in training where the GPU has FP8 (compute capability >= 8.9)
    fused_mlp: bool = True  # the MLP's matmuls as a Gluon kernel with ReLU^2 in it, on Hopper or newer; same bits
    fused_qkv: bool = True  # QK norm, rotary and the value mix as one Triton kernel each way, on a CUDA GPU
    fused_attention: bool = True  # the windowed attention as Triton kernels on Hopper or newer; else FlexAttention
    compile: bool = True  # torch.compile the model and Newton-Schulz
    coordinate_descent_tuning: bool = False  # inductor's tuning of its kernels, as the record had: a longer compile
    warmup_steps: int = 2  # untimed steps on dummy data that compile everything; then the state is restored
    seed: int = 0  # for the initial weights and the dummy warm-up data
    collective_timeout: int = 1800  # seconds a rank waits for the others in a collective before the run stops
    # logging and checkpoints
    tag: str = ""  # the log goes to records/<tag>/; default <date>_run
    checkpoint_every: int = 0  # steps between checkpoints, plus one at the end; 0: none (timing untouched)
    checkpoint_dir: str = "checkpoints"  # checkpoints go to <checkpoint_dir>/<run id>/step_NNNNNN.pt
    resume: str = ""  # a checkpoint to continue from
    profile_at: int = 0  # > 0: torch.profiler on steps profile_at+1 .. +3 (slowed); kernel table beside the log
    preset: str = ""  # "smoke": a tiny configuration for a 2-core CPU that makes its own data (see PRESETS)


# The smoke preset's own data, under the working directory: made once by data/synthetic.py's generator (ids below
# 1024, 1023 the end of text, seed 0) and never changed; the folder is named for its content, so other content is
# another folder. Its first two train shards and its val shard are the 20-step run's; three larger ones feed longer
# runs (about 370 steps of 8 x 1024 tokens).
SMOKE_VOCAB, SMOKE_SEED = 1024, 0
SMOKE_SHARDS = {"fineweb_train_000001.bin": 24_576, "fineweb_train_000002.bin": 24_576,  # name -> tokens
                **{f"fineweb_train_00000{i}.bin": 1_000_000 for i in (3, 4, 5)}, "fineweb_val_000000.bin": 24_576}
SMOKE_DATA = Path(f"data/synthetic_smoke_vocab{SMOKE_VOCAB}_eot{SMOKE_VOCAB - 1}_seed{SMOKE_SEED}_"
                  f"{sum(SMOKE_SHARDS.values())}tokens")
PRESETS = {
    "smoke": dict(
        train_files=f"{SMOKE_DATA}/fineweb_train_*.bin", val_files=f"{SMOKE_DATA}/fineweb_val_*.bin",
        val_tokens=4096, batch_seqs=2, seq_len=1024, vocab_size=1024, num_layers=4, num_heads=2, model_dim=64,
        num_iterations=20, window_tokens=896, val_every=10, compile=False, warmup_steps=1, tag="smoke",
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# Constants the record fixes

# logits -> 30 sigmoid(logits / 7.5), in (0, 30): tanh soft cap by @Grad62304977 after Gemma 2, narrowed by
# @KoszarskyB, and shifted to a sigmoid by @YouJiacheng (2 sigmoid(2x) = tanh(x) + 1)
SOFTCAP, SOFTCAP_TEMPERATURE = 30.0, 7.5
ATTENTION_SCALE = 0.12  # instead of 1/sqrt(head_dim), by @leloykun, after learnable scales by @brendanh0gan
NO_ATTENTION_LAYER = 7  # the 8th layer has no attention, by @YouJiacheng
# Of the 12 layers (0..5 the U-Net's encoder, 6..11 its decoder): the value embedding each mixes into its v (012 ...
# 012 by @YouJiacheng; none in the middle), and its attention window (the decoder mirrors the encoder)
VALUE_EMBEDS = (0, 1, 2, None, None, None, None, None, None, 0, 1, 2)
WINDOWS = ("long", "short", "short", "short", "long", "short", "short", "long", "short", "short", "short", "long")
BLOCK_SIZE = 128  # tokens a FlexAttention block; the attention window grows by whole blocks
# small eps by @YouJiacheng: another fix for the world-size dependence found by @fernbear.bsky.social
ADAM_BETAS, ADAM_EPS = (0.8, 0.95), 1e-10


# ----------------------------------------------------------------------------------------------------------------
# Model


def norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


def row_scale(x: Tensor) -> Tensor:
    """norm's factor for each row of x, (..., 1) float32: norm(x) is scaled(x, row_scale(x)), as F.rms_norm computes
    it for bf16 x (in float32, with float32's eps)."""
    return rms_scale(x.float().square().mean(-1, keepdim=True))


def rms_scale(mean_square: Tensor) -> Tensor:
    """rsqrt(mean_square + float32's eps): the RMS norm's factor from a row's mean square, as F.rms_norm takes it."""
    return torch.rsqrt(mean_square + torch.finfo(torch.float32).eps)


def scaled(x: Tensor, r: Tensor) -> Tensor:
    return (x.float() * r).type_as(x)


def softcap(logits: Tensor) -> Tensor:
    """SOFTCAP * sigmoid(logits / SOFTCAP_TEMPERATURE), in float32."""
    return SOFTCAP * torch.sigmoid(logits.float() / SOFTCAP_TEMPERATURE)


def next_multiple(n: float, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


class CastedLinear(nn.Linear):
    """A bias-free linear layer whose weight is cast to the activation dtype."""

    def __init__(self, in_features: int, out_features: int, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if zero_init:  # zero init of output projections, suggested by @Grad62304977
            self.weight.detach().zero_()

    def reset_parameters(self):
        bound = 3**0.5 * 0.5 * self.in_features**-0.5  # uniform with std 0.5 / sqrt(fan_in): better than 1/sqrt(3)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.type_as(x))


class Embedding(nn.Embedding):
    """A bf16 table whose gradient is summed in float32, in place, over a step's sequences: each lookup's backward
    adds into grad_sum, and take_grad() makes the table's .grad of the sum once a step. nn.Embedding's backward
    would, each sequence, zero a float32 table the size of this one, add into it, round it to bf16 and add that to
    .grad."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)  # drawn in float32, as the record's tables are, then rounded
        self.weight = nn.Parameter(self.weight.detach().bfloat16())
        self.grad_sum = nn.Buffer(torch.zeros(num_embeddings, embedding_dim), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return LookupAddingGrad.apply(self.weight, ids, self.grad_sum)

    def take_grad(self):
        """The table's .grad: grad_sum rounded to the table's dtype; grad_sum starts again at 0."""
        self.weight.grad = self.grad_sum.to(self.weight.dtype)
        self.grad_sum.zero_()


def embedding_tables(model: nn.Module) -> list[Embedding]:
    return [module for module in model.modules() if isinstance(module, Embedding)]


class LookupAddingGrad(torch.autograd.Function):
    """table[ids], whose backward adds the table's gradient into grad_sum and gives the table none."""

    @staticmethod
    def forward(ctx, table: Tensor, ids: Tensor, grad_sum: Tensor) -> Tensor:
        ctx.save_for_backward(ids, grad_sum)
        return F.embedding(ids, table)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        ids, grad_sum = ctx.saved_tensors
        grad_sum.index_add_(0, ids.flatten(), grad_out.flatten(end_dim=-2).float())
        return None, None, None


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary rotation of x (B, T, H, head_dim) by cos, sin (T, head_dim / 2); rotate(x, cos, -sin) undoes it."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Rotary(nn.Module):
    """Half-truncated rotary embedding (by @YouJiacheng): 32 of the 64 frequency pairs of a 128-wide head
    rotate, with angular frequency (1/1024)^(j/31); the other 32 have frequency 0 and pass through."""

    def __init__(self, head_dim: int, max_seq_len: int):
        super().__init__()
        freq = (1 / 1024) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
        freq = torch.cat([freq, freq.new_zeros(head_dim // 4)])
        theta = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freq)  # (positions, head_dim / 2)
        self.cos = nn.Buffer(theta.cos(), persistent=False)
        self.sin = nn.Buffer(theta.sin(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, H, head_dim)
        return rotate(x.float(), self.cos[:x.size(-3)], self.sin[:x.size(-3)]).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, max_seq_len: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        bound = 3**0.5 * 0.5 * dim**-0.5  # init scale by @YouJiacheng
        # merged QKV weight: suggested by many, implemented by @fernbear.bsky.social, improved by @YouJiacheng
        self.qkv_w = nn.Parameter(torch.empty(3, dim, dim).uniform_(-bound, bound))
        self.lambdas = nn.Parameter(torch.tensor([0.5, 0.5]))  # mix of v and the value embedding
        self.rotary = Rotary(self.head_dim, max_seq_len)
        self.c_proj = CastedLinear(dim, dim, zero_init=True)

    def forward(self, x: Tensor, r: Tensor, ve: Tensor | None,
                mask: "BlockMask | DocumentWindows") -> tuple[Tensor, Tensor]:
        """x plus the attention of norm(x) = scaled(x, r), and that sum's row scale."""
        B, T, D = x.shape
        out = attention_block(x, r, self.qkv_w.flatten(end_dim=1).type_as(x), ve, self.lambdas, self.rotary, mask)
        return residual_projection(x, out.reshape(B, T, D), self.c_proj.weight.type_as(x))


class MLP(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.c_fc = CastedLinear(dim, 4 * dim)
        self.c_proj = CastedLinear(4 * dim, dim, zero_init=True)

    def forward(self, x: Tensor, r: Tensor) -> Tensor:
        """The MLP of norm(x) = scaled(x, r)."""
        return relu2_mlp(x, r, self.c_fc.weight.type_as(x), self.c_proj.weight.type_as(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, max_seq_len: int, has_attention: bool):
        super().__init__()
        self.attn = CausalSelfAttention(dim, num_heads, max_seq_len) if has_attention else None
        self.mlp = MLP(dim)
        self.lambdas = nn.Parameter(torch.tensor([1.0, 0.0]))  # mix of the residual stream and x0

    def forward(self, x: Tensor, ve: Tensor | None, x0: Tensor, mask: "BlockMask | DocumentWindows") -> Tensor:
        x = self.lambdas[0] * x + self.lambdas[1] * x0
        # The attention and the MLP take norm(x) as x and its row scale: their fused matmuls scale in their epilogues,
        # so norm(x) is never stored. Each residual add lands in the kernel that sums the next row scale's squares:
        # the attention's in its output projection (residual_projection).
        r = row_scale(x)
        if self.attn is not None:
            x, r = self.attn(x, r, ve, mask)
        return x + self.mlp(x, r)


def layer_tables(num_layers: int) -> tuple[tuple, tuple]:
    """VALUE_EMBEDS and WINDOWS for a U-Net of num_layers (even): the record's own tables for 12 layers, and for
    others (the smoke preset's 4) the same rule: the first and the last min(3, num_layers / 2) layers take value
    embeddings 0, 1, 2 in order; the encoder takes the encoder's windows in order, and the decoder mirrors it."""
    half, num_ve = num_layers // 2, min(3, num_layers // 2)
    value_embeds = VALUE_EMBEDS[:num_ve] + (None,) * (num_layers - 2 * num_ve) + VALUE_EMBEDS[:num_ve]
    encoder = (WINDOWS[:6] * half)[:half]
    return value_embeds, encoder + encoder[::-1]


class GPT(nn.Module):
    """A U-Net of transformer blocks (U-Net by @brendanh0gan): encoder layer i's output is added, weighted,
    to the input of decoder layer num_layers-1-i. Three value embeddings (by @KoszarskyB, after @Grad62304977's
    value residual) feed the layers VALUE_EMBEDS names. forward returns the mean cross entropy of the soft-capped
    logits."""

    def __init__(self, vocab_size: int, num_layers: int, num_heads: int, model_dim: int, max_seq_len: int):
        super().__init__()
        self.eot_token = vocab_size - 1  # the last token ends a document (GPT-2: 50256)
        self.layer_value_embeds, self.layer_windows = layer_tables(num_layers)
        self.embed = Embedding(vocab_size, model_dim)
        self.value_embeds = nn.ModuleList([Embedding(vocab_size, model_dim) for _ in range(min(3, num_layers // 2))])
        self.blocks = nn.ModuleList([Block(model_dim, num_heads, max_seq_len, i != NO_ATTENTION_LAYER)
                                     for i in range(num_layers)])
        self.skip_weights = nn.Parameter(torch.ones(num_layers // 2))
        # the vocabulary padded to a multiple of 128 for the matmul: suggested by @Grad62304977, after Karpathy
        self.lm_head = CastedLinear(model_dim, next_multiple(vocab_size, 128), zero_init=True)

    def forward(self, input_seq: Tensor, target_seq: Tensor, window_blocks: Tensor) -> Tensor:
        """input_seq, target_seq: (T,) token ids; window_blocks: 0-d int tensor, the long window in blocks
        (a tensor, so that the window can grow without recompiling)."""
        ve = [embed(input_seq) for embed in self.value_embeds]
        long_mask, short_mask = attention_masks(document_ids(input_seq, self.eot_token), window_blocks)
        masks = dict(long=long_mask, short=short_mask)

        x = x0 = norm(self.embed(input_seq)[None])  # norm of the embedding by @Grad62304977
        skips, half = [], len(self.skip_weights)
        for i, block in enumerate(self.blocks):
            if i >= half:
                x = x + self.skip_weights[i - half] * skips.pop()
            which_ve = self.layer_value_embeds[i]
            x = block(x, ve[which_ve] if which_ve is not None else None, x0, masks[self.layer_windows[i]])
            if i < half:
                skips.append(x)
        x = norm(x)[0]
        if self.training:
            return head_loss(x, self.lm_head.weight, target_seq)
        return F.cross_entropy(softcap(self.lm_head(x)), target_seq)


# ----------------------------------------------------------------------------------------------------------------
# Attention block masks: document-causal with block-wise sliding windows (block masks by @YouJiacheng)
# A query attends to keys at or before it in the same document. FlexAttention skips whole 128x128 blocks:
# "full" blocks need no masking, "partial" blocks apply the document-causal mask element-wise. The window
# is counted in blocks: a query block keeps its newest w blocks (at most w-1 full ones). The long mask uses
# w, the short mask w // 2 (long/short windows by @leloykun and @YouJiacheng, after Gemma 2, from a suggestion
# by @Grad62304977).


def document_ids(tokens: Tensor, eot_token: int) -> Tensor:
    """The document of every token: each end-of-text token starts a new document."""
    return (tokens == eot_token).cumsum(0)


def _newest_first(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """(nq, nk) bool -> per query block, the number of True key blocks and all key block indices, the True
    ones first, newest first."""
    num = blocks.sum(dim=-1, dtype=torch.int32)
    order = blocks.argsort(dim=-1, descending=False, stable=True).flip(-1).to(torch.int32)
    return num, order


def block_tables(docs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per query block, its partial and full key blocks: (partial_num, partial_idx, full_num, full_idx),
    the counts (nb,) and the indices (nb, nb) newest first."""
    blocks = docs.view(-1, BLOCK_SIZE)
    first, last = blocks[:, 0], blocks[:, -1]  # first and last document of every block
    idx = torch.arange(len(blocks), device=docs.device)
    q, k = idx[:, None], idx[None, :]
    overlap = (first[:, None] <= last[None, :]) & (first[None, :] <= last[:, None])
    one_document = (first[:, None] == last[None, :]) & (first[None, :] == last[:, None])
    full = (q > k) & one_document
    partial = (q >= k) & overlap & ~full
    return (*_newest_first(partial), *_newest_first(full))


def window_counts(partial_num: Tensor, full_num: Tensor, window_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Cut the block counts to a window of w blocks: at most w-1 full blocks, and the partial blocks to what is
    left of w (at least 1, the diagonal block). The short window is 0 blocks while the long one is a single
    block (steps 0-103 at the defaults): then no full block is kept, where the record computed -1."""
    return (torch.clamp_max(partial_num, torch.clamp_min(window_blocks - full_num, 1)),
            torch.clamp_max(full_num, window_blocks - 1).clamp_min(0))


def block_masks(docs: Tensor, window_blocks: Tensor) -> tuple[BlockMask, BlockMask]:
    """The long (window_blocks) and short (window_blocks // 2) masks of a (T,) sequence with document ids docs."""

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[q_idx] == docs[kv_idx])

    partial_num, partial_idx, full_num, full_idx = block_tables(docs)

    def build(w: Tensor) -> BlockMask:
        p_num, f_num = window_counts(partial_num, full_num, w)
        return BlockMask.from_kv_blocks(p_num[None, None], partial_idx[None, None], f_num[None, None],
                                        full_idx[None, None], BLOCK_SIZE=BLOCK_SIZE, mask_mod=document_causal)

    return build(window_blocks), build(window_blocks // 2)


# The same masks as one range of keys a query. A query block i keeps the key blocks i-w+1 .. i (w at least 1) that
# share a document with it, document-causal inside them; documents being contiguous, query q sees the keys k with
#     max(start(q), 128 (i - w + 1)) <= k <= q,    start(q) the first token of q's document.
# tests/test_attention.py checks this against the block masks for every window of the schedule.


class DocumentWindows(NamedTuple):
    """A long or short mask as the kernels take it: per token the first token of its document (starts) and the end
    of that document (ends, exclusive), int32 (T,); the window in blocks, a 0-d int32 tensor."""
    starts: Tensor
    ends: Tensor
    window_blocks: Tensor


def document_windows(docs: Tensor, window_blocks: Tensor) -> tuple[DocumentWindows, DocumentWindows]:
    """block_masks' long and short masks as DocumentWindows."""
    starts = torch.searchsorted(docs, docs, out_int32=True)  # docs are sorted: the first index of each id
    ends = torch.searchsorted(docs, docs, right=True, out_int32=True)
    return DocumentWindows(starts, ends, window_blocks), DocumentWindows(starts, ends, window_blocks // 2)


def window_first_keys(starts: Tensor, window_blocks: Tensor) -> Tensor:
    """The kernels' rule: per query q, the first key it sees, max(start(q), 128 (q // 128 - w + 1)); it sees the
    keys from there to q."""
    pos = torch.arange(len(starts), device=starts.device)
    return torch.maximum(starts, (pos // BLOCK_SIZE - window_blocks.clamp_min(1) + 1) * BLOCK_SIZE)


def window_dense_mask(starts: Tensor, window_blocks: Tensor) -> Tensor:
    """The kernels' rule as a (T, T) bool matrix: query q sees window_first_keys(...)[q] <= k <= q."""
    pos = torch.arange(len(starts), device=starts.device)
    first = window_first_keys(starts, window_blocks)
    return (pos[None, :] >= first[:, None]) & (pos[None, :] <= pos[:, None])


def window_blocks_at(step: int, args: Hyperparameters) -> int:
    """The long window in blocks at a step: window_tokens * step / num_iterations rounded up to a multiple of
    128 tokens (128 at step 0, 1792 at the end; warm-up by @fernbear.bsky.social, block-wise by @YouJiacheng)."""
    return next_multiple(args.window_tokens * step / args.num_iterations, BLOCK_SIZE) // BLOCK_SIZE


def window_tensor(step: int, args: Hyperparameters, device: torch.device) -> Tensor:
    """The window as the model takes it: a 0-d int32 tensor, so that it changes without recompiling."""
    return torch.tensor(window_blocks_at(step, args), dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------------------------
# Muon: MomentUm Orthogonalized by Newton-Schulz (Keller Jordan)

# torch 2.13 renamed these two collectives and warns on the old names, which are all that older versions have
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def newton_schulz5(G: Tensor, steps: int = 5) -> Tensor:
    """Approximately orthogonalise G (..., m, n), batched over leading dimensions (batched by @scottjmaddox,
    brought into the record by @YouJiacheng).

    With G = U S V^T, returns about U S' V^T with S' spread around 1 (roughly 0.7 to 1.2) instead of the exact
    U V^T: the quintic's coefficients maximise the slope at 0, so small singular values grow fast in five
    steps, and it runs stably in bf16. Works on the wide orientation so that X X^T is the smaller product.
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A  # by @jxbz, @leloykun and @YouJiacheng
        X = a * X + B @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """SGD with Nesterov momentum whose update is orthogonalised by Newton-Schulz, for the weight matrices
    inside the blocks (not embeddings, head or scalars: those go to Adam). A 3-d parameter such as the merged
    QKV weight (3, d, d) is orthogonalised as 3 separate matrices.

    Across ranks the parameters of a group (all of one size) are shared out round-robin: rank r
    orthogonalises parameters r, r + world_size, ... (by @YouJiacheng). Muon averages the gradients itself, and
    only onto their owner (a reduce-scatter per round of world_size parameters, half the bytes of an all-reduce);
    the updates are then all-gathered. With world_size 1 there is no communication, and no process group is needed.
    """

    def __init__(self, params, lr: float, momentum: float, rank: int = 0, world_size: int = 1,
                 orthogonalize=newton_schulz5):
        params = list(params)
        sizes = sorted({p.numel() for p in params}, reverse=True)
        groups = [dict(params=[p for p in params if p.numel() == size]) for size in sizes]
        super().__init__(groups, dict(lr=lr, momentum=momentum))
        self.rank, self.world_size, self.orthogonalize = rank, world_size, orthogonalize
        self.reduced = None

    def owner(self, index: int) -> int:
        """The rank that computes the update of the index-th parameter of a group."""
        return index % self.world_size

    def _rounds(self, group: dict):
        """(the group's parameters of one round, this rank's parameter in the round or None), in a fixed order."""
        params = group["params"]
        for base in range(0, len(params), self.world_size):
            i = base + self.rank
            yield params[base:base + self.world_size], params[i] if i < len(params) else None

    def reduce_grads(self):
        """Start averaging the gradients onto their owners, async, so that the caller can queue other
        communication behind it; step() waits. Collective: every rank must call it."""
        self.reduced = []
        for group in self.param_groups:
            for params, _ in self._rounds(group):
                grads = [p.grad.flatten() for p in params]  # a group's shapes may differ: (768, 3072), (3072, 768)
                grads += [torch.zeros_like(grads[0])] * (self.world_size - len(grads))  # a short last round
                grad = torch.empty_like(grads[0])
                work = reduce_scatter(grad, torch.cat(grads), op=dist.ReduceOp.AVG, async_op=True)
                self.reduced.append((work, grad))

    def _updates(self, params: list[Tensor], grads: list[Tensor], momentum: float) -> list[Tensor]:
        """Nesterov momentum, then orthogonalize, for each parameter; the update comes flattened, in the layout of
        its parameter. One orthogonalize call takes all the matrices of one shape: at these sizes a call a
        parameter leaves most of the GPU idle."""
        tall, wide = [], []  # each nesterov gradient as matrices (..., m, n) with m <= n: X X^T the smaller
        for p, grad in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(grad)
            buf = state["momentum_buffer"]
            buf.lerp_(grad, 1 - momentum)
            nesterov = grad.lerp_(buf, momentum)
            tall.append(nesterov.size(-2) > nesterov.size(-1))
            wide.append(nesterov.mT if tall[-1] else nesterov)
        by_shape = {}
        for i, x in enumerate(wide):
            by_shape.setdefault(x.shape[-2:], []).append(i)
        updates = [None] * len(wide)
        for shape, indices in by_shape.items():
            matrices = [wide[i].reshape(-1, *shape) for i in indices]
            batch = self.orthogonalize(torch.cat(matrices))
            for i, update in zip(indices, batch.split([len(m) for m in matrices])):
                update = update.view(wide[i].shape)
                updates[i] = (update.mT if tall[i] else update).flatten()
        return updates

    @staticmethod
    def _apply(params: list[Tensor], updates: list[Tensor], lr: float):
        for p, u in zip(params, updates):
            p.add_(u.view_as(p), alpha=-lr * max(1, p.size(-2) / p.size(-1)) ** 0.5)

    @torch.no_grad()
    def step(self):
        if self.world_size == 1:
            for group in self.param_groups:
                params = group["params"]
                self._apply(params, self._updates(params, [p.grad for p in params], group["momentum"]), group["lr"])
            return
        if self.reduced is None:
            self.reduce_grads()
        reduced = iter(self.reduced)
        gathers = []
        # async all-gathers instead of an all-reduce (by @YouJiacheng); a group's Newton-Schulz runs once its
        # gradients have arrived, and before any update is applied, so that it overlaps the all-gathers of the
        # groups before it and whatever communication the caller queued after reduce_grads()
        for group in self.param_groups:
            rounds = list(self._rounds(group))
            mine, grads = [], []
            for params, p in rounds:
                work, grad = next(reduced)
                work.wait()
                if p is not None:
                    mine.append(p)
                    grads.append(grad.view_as(p))
            updates = iter(self._updates(mine, grads, group["momentum"]))
            for params, p in rounds:
                # the last round may have fewer parameters than ranks: the others send zeros
                update = next(updates) if p is not None else params[0].new_zeros(params[0].numel(),
                                                                                  dtype=torch.bfloat16)
                gathered = torch.empty(self.world_size * update.numel(), dtype=update.dtype, device=update.device)
                gathers.append((all_gather(gathered, update, async_op=True), gathered, params, group))
        self.reduced = None
        for work, gathered, params, group in gathers:
            work.wait()
            self._apply(params, list(gathered.view(self.world_size, -1)), group["lr"])


# ----------------------------------------------------------------------------------------------------------------
# Data: shards of 256 int32 header (magic, version, token count) then uint16 GPT-2 token ids

SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
EOT_TOKEN = Hyperparameters.vocab_size - 1  # 50256, end of text: starts each document (the model's rule too)


class DataError(Exception):
    """Missing or bad token shards; the message names the file and the fix."""


def read_shard_header(path) -> int:
    """Check a shard's header against its size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as f:
        header = np.frombuffer(f.read(HEADER_INTS * 4), dtype="<i4")
    if len(header) < HEADER_INTS:
        raise DataError(f"{path}: {size} bytes, shorter than its {HEADER_INTS * 4}-byte header: truncated")
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: magic number {header[0]}, expected {SHARD_MAGIC}: not a token shard")
    if header[1] != SHARD_VERSION:
        raise DataError(f"{path}: format version {header[1]}, this script reads version {SHARD_VERSION}")
    num_tokens, held = int(header[2]), (size - HEADER_INTS * 4) / 2
    if held < num_tokens:
        raise DataError(f"{path}: holds {held:,.0f} of the {num_tokens:,} tokens its header promises: truncated "
                        f"(an interrupted download?)")
    if held > num_tokens:
        raise DataError(f"{path}: {size - HEADER_INTS * 4 - 2 * num_tokens:,} bytes more than the {num_tokens:,} "
                        f"tokens its header says: corrupt")
    return num_tokens


def load_shard(path, pin: bool, max_tokens: int | None = None) -> Tensor:
    """A shard's tokens (its first max_tokens, when given) in a CPU tensor."""
    num_tokens = read_shard_header(path)
    if max_tokens is not None:
        num_tokens = min(num_tokens, max_tokens)
    # pinned: async copies to the GPU; read straight into the tensor, no pinning copy (both by @YouJiacheng)
    tokens = torch.empty(num_tokens, dtype=torch.uint16, pin_memory=pin)
    with open(path, "rb", buffering=0) as f:
        f.seek(HEADER_INTS * 4)
        f.readinto(tokens.numpy())
    return tokens


SCAN_BYTES = 1 << 20  # scan_shard reads a shard in pieces of this size (which stay in the cache)


def scan_shard(path) -> tuple[int, int, str]:
    """(size in bytes, largest token id, sha256 of the file) of a shard whose header checked out, in one pass over
    its bytes. hashlib and numpy release the GIL, so threads scan shards in parallel."""
    size, largest, digest = 0, 0, hashlib.sha256()
    buffer = memoryview(bytearray(SCAN_BYTES))
    with open(path, "rb", buffering=0) as f:
        header = f.read(HEADER_INTS * 4)
        size += len(header)
        digest.update(header)
        while n := f.readinto(buffer):
            size += n
            digest.update(buffer[:n])
            largest = max(largest, int(np.frombuffer(buffer[:n], dtype="<u2").max()))
    return size, largest, digest.hexdigest()


def batches_in_shard(num_tokens: int, batch_tokens: int) -> int:
    """Steps a shard feeds: a batch needs batch_tokens + 1 tokens, and the tail of a shard is dropped."""
    return max(0, (num_tokens - batch_tokens - 2) // batch_tokens + 1)


def batch_to_device(tokens: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """n + 1 tokens (uint16 or int32) -> inputs (n,) int32 and targets (n,) int64 on the device, each a new tensor.
    The warm-up's dummy batches go through here too: a kernel compiled for a target pointer misaligned by one
    token (a view of the tokens) would compile again for the loader's aligned one, in the first timed step."""
    inputs = tokens[:-1].to(device, dtype=torch.int32, non_blocking=True)
    targets = tokens[1:].to(device, dtype=torch.int64, non_blocking=True)
    return inputs, targets


class TrainLoader:
    """Feeds each step's tokens to this rank. A step takes the next batch_tokens (+1 for the targets) of the
    current shard; rank r gets the r-th of world_size contiguous slices. The next shard is read in a
    background thread while the current one is used, so a shard change does not stall a step. `fingerprint` is
    the data's (check_data's), which checkpoints record beside the loader's place in it."""

    def __init__(self, files: list[str], batch_tokens: int, rank: int, world_size: int, device: torch.device,
                 shard: int = 0, pos: int = 0, fingerprint: list[tuple] | None = None):
        self.files, self.batch_tokens, self.device = files, batch_tokens, device
        self.fingerprint = fingerprint
        self.local_tokens = batch_tokens // world_size
        self.offset = rank * self.local_tokens
        self.pin = device.type == "cuda"
        self.reader = ThreadPoolExecutor(max_workers=1)
        self.shard, self.pos = shard, pos
        self.tokens = load_shard(files[shard], self.pin)
        self.next_tokens = self._prefetch(shard + 1)

    def _prefetch(self, shard: int):
        return self.reader.submit(load_shard, self.files[shard], self.pin) if shard < len(self.files) else None

    def next_batch(self) -> tuple[Tensor, Tensor]:
        if self.pos + self.batch_tokens + 1 >= len(self.tokens):
            self.shard, self.pos = self.shard + 1, 0
            self.tokens = self.next_tokens.result()
            self.next_tokens = self._prefetch(self.shard + 1)
        buf = self.tokens[self.pos + self.offset:][:self.local_tokens + 1]
        self.pos += self.batch_tokens
        return batch_to_device(buf, self.device)

    def state(self) -> dict:
        return dict(shard=self.shard, pos=self.pos)


def val_batches(tokens: Tensor, args: Hyperparameters, rank: int, world_size: int, device: torch.device):
    """The val sequences of this rank: step k covers tokens [k * world_size * seq_len, ...), rank r its r-th
    seq_len slice. Every world size sees the same val_tokens / seq_len sequences."""
    for start in range(0, args.val_tokens, world_size * args.seq_len):
        yield batch_to_device(tokens[start + rank * args.seq_len:][:args.seq_len + 1], device)


# ----------------------------------------------------------------------------------------------------------------
# Training steps


def lr_factor(step: int, args: Hyperparameters) -> float:
    """1 until the last cooldown_frac of the steps, then linear decay towards 0.1."""
    w = min((1 - step / args.num_iterations) / args.cooldown_frac, 1.0)
    return w + (1 - w) * 0.1


def muon_momentum(step: int, args: Hyperparameters) -> float:
    frac = min(step / args.muon_momentum_steps, 1)
    return (1 - frac) * args.muon_momentum_start + frac * args.muon_momentum_end


def build_optimizers(model: nn.Module, args: Hyperparameters, rank: int, world_size: int):
    """Adam for the lm_head, the embeddings and the scalars; Muon for the matrices inside the blocks."""
    matrices = [p for p in model.blocks.parameters() if p.ndim >= 2]
    embeddings = [model.embed.weight, *model.value_embeds.parameters()]
    scalars = [p for p in model.parameters() if p.ndim < 2]
    adam = torch.optim.Adam([dict(params=[model.lm_head.weight]), dict(params=embeddings), dict(params=scalars)],
                            betas=ADAM_BETAS, eps=ADAM_EPS, fused=True)
    # dynamic: one graph for every shape Muon batches (three on one GPU), where each shape was a compile of its own
    orthogonalize = torch.compile(newton_schulz5, dynamic=True) if args.compile else newton_schulz5
    muon = Muon(matrices, lr=args.muon_lr, momentum=args.muon_momentum_start, rank=rank, world_size=world_size,
                orthogonalize=orthogonalize)
    set_schedule(adam, muon, 0, args)
    return adam, muon


def set_schedule(adam: torch.optim.Adam, muon: Muon, step: int, args: Hyperparameters):
    """This step's learning rates (each its base value x lr_factor) and Muon momentum."""
    scale = lr_factor(step, args)
    for group, lr in zip(adam.param_groups, (args.head_lr, args.embed_lr, args.scalar_lr)):  # build's order
        group["lr"] = lr * scale
    for group in muon.param_groups:
        group["lr"], group["momentum"] = args.muon_lr * scale, muon_momentum(step, args)


def train_step(model: nn.Module, inputs: Tensor, targets: Tensor, window: Tensor, seq_len: int,
               adam: torch.optim.Adam, muon: Muon) -> Tensor:
    """One optimizer step on this rank's share of the batch; returns the loss averaged over all ranks.
    The gradient is the mean over all batch_seqs sequences, for any world size: each of the `accum`
    sequences a rank holds is weighted 1/accum, then the ranks average."""
    accum = len(inputs) // seq_len
    tables = embedding_tables(model)
    loss = torch.zeros((), device=inputs.device)
    with record_function("forward_backward"):  # a phase in --profile_at tables, as is each optimizer's step
        for seq_in, seq_target in zip(inputs.split(seq_len), targets.split(seq_len)):
            seq_loss = model(seq_in, seq_target, window) / accum
            seq_loss.backward()
            loss += seq_loss.detach()
    # one rank in a process group (torchrun --nproc_per_node=1) has nothing to average: its collectives would copy
    averaging = dist.is_initialized() and dist.get_world_size() > 1
    if averaging:
        # async, in this order on the wire: Muon's reduce-scatters, then the all-reduces of Adam's gradients and
        # the loss, which run while Muon orthogonalises; its all-gathers queue behind them. The tables' float32
        # sums are averaged before they are rounded, so that any number of ranks rounds them alike.
        muon.reduce_grads()
        table_weights = {id(table.weight) for table in tables}
        grads = [p.grad for group in adam.param_groups for p in group["params"] if id(p) not in table_weights]
        averaged = [dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)
                    for t in [*(table.grad_sum for table in tables), *grads, loss]]
    muon.step()
    if averaging:
        for work in averaged:
            work.wait()
    for table in tables:
        table.take_grad()
    adam.step()
    model.zero_grad(set_to_none=True)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, val_tokens: Tensor, window: Tensor, args: Hyperparameters, rank: int,
             world_size: int, device: torch.device) -> float:
    model.eval()
    losses = [model(x, y, window) for x, y in val_batches(val_tokens, args, rank, world_size, device)]
    loss = torch.stack(losses).mean()
    if dist.is_initialized():
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
    model.train()
    return loss.item()


# ----------------------------------------------------------------------------------------------------------------
# main: the steps of a run


def setup_distributed(collective_timeout: int) -> tuple[int, int, torch.device]:
    """torchrun's RANK / WORLD_SIZE / LOCAL_RANK -> (rank, world_size, device); NCCL on CUDA, gloo on the CPU.
    A plain `python train_gpt.py` runs as one process without a process group. A collective that waits longer
    than collective_timeout seconds fails: gloo raises (Stops.exit_code says so in one line), NCCL's watchdog
    takes the process down with its own report. A worker of torchrun stops when torchrun dies."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        stop_with_launcher()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "RANK" in os.environ:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                                timeout=timedelta(seconds=collective_timeout))
    return rank, world_size, device


class Logger:
    """Rank 0 writes one log per run, records/<tag>/<run id>.txt; the other ranks write nothing."""

    def __init__(self, args: Hyperparameters, rank: int, run_id: str):
        self.path = None
        if rank == 0:
            self.path = log_folder(args) / f"{run_id}.txt"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            print(f"log: {self.path}", flush=True)

    def __call__(self, text: str, console: bool = True):
        if self.path is not None:
            end = self.path.stat().st_size if self.path.exists() else 0
            try:
                with self.path.open("a") as f:
                    print(text, file=f)
            except OSError as e:  # a full disk: the log keeps its last whole line, and the run stops
                if self.path.exists():
                    os.truncate(self.path, end)
                raise RunError(f"could not write the log {self.path}: {e.strerror or e}") from None
            if console:
                print(text, flush=True)


def environment_report(args: Hyperparameters, world_size: int, device: torch.device) -> str:
    lines = [f"Python {sys.version}", f"PyTorch {torch.__version__}, CUDA {torch.version.cuda}",
             f"world_size {world_size}, device {device.type}"]
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
    except (OSError, subprocess.TimeoutExpired):
        lines.append("nvidia-smi: not available")
    lines += [f"{f.name} = {getattr(args, f.name)!r}" for f in dataclasses.fields(args)]
    return "\n".join(lines)


def start_log(args: Hyperparameters, rank: int, world_size: int, device: torch.device, run_id: str) -> Logger:
    """The log opens with this file's source, the versions, nvidia-smi and every hyperparameter."""
    log = Logger(args, rank, run_id)
    log(Path(__file__).read_text(), console=False)
    log("=" * 100, console=False)
    log(environment_report(args, world_size, device), console=False)
    log("=" * 100, console=False)
    return log


def build_model(args: Hyperparameters, device: torch.device) -> nn.Module:
    """The same initial weights on every rank and any world size: made on the CPU from the seed, then
    broadcast from rank 0 all the same."""
    torch.manual_seed(args.seed)
    model = GPT(args.vocab_size, args.num_layers, args.num_heads, args.model_dim, args.seq_len).to(device)
    if dist.is_initialized():
        for p in model.parameters():
            dist.broadcast(p.detach(), 0)
    return model


def warm_up_note(args: Hyperparameters) -> str:
    """Said before the warm-up, which prints nothing until it ends; its times are those of the warmup_time lines of
    the logs in records/."""
    steps = f"{args.warmup_steps} untimed step" + "s" * (args.warmup_steps != 1)
    if not args.compile:
        return f"warming up: running {steps}, without compiling (--compile=0)"
    if not args.warmup_steps:
        return "warming up: none (--warmup_steps=0), so the first timed steps compile the model"
    return (f"warming up: compiling the model and running {steps} (a cold compile takes about 1 minute on one "
            f"H100/H200, up to 2 on several GPUs; about 20 s with a warm cache)")


def block_kinds(model: "GPT") -> list[tuple[nn.Module, bool]]:
    """A copy of the model's first block of each kind (with or without attention and a value embedding), and
    whether it takes a value embedding: a thread may run them while the model trains."""
    kinds = {}
    for block, which_ve in zip(model.blocks, model.layer_value_embeds):
        kinds.setdefault((block.attn is None, which_ve is None), block)
    return [(copy.deepcopy(block), not no_ve) for (_, no_ve), block in kinds.items()]


def precompile_kernels(blocks: list[tuple[nn.Module, bool]], args: Hyperparameters, device: torch.device):
    """Run a short sequence forward and back through each block of block_kinds, and the Hopper head loss's
    kernels on a few rows. A GPU kernel of ours compiles at its first launch, for its dtypes and tiles and for
    which of its sizes divide by 16, not for the sizes themselves: so this compiles what the model's steps launch.
    warm_up() runs it in a thread while torch.compile compiles the model, much of that time waiting on the worker
    processes that compile inductor's kernels; the model's first step then finds ours compiled, where it would
    compile them one after another."""
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the current device is a thread's own
    T = min(args.seq_len, 32 * BLOCK_SIZE)  # sizes that divide by 16 where a step's do
    eot = args.vocab_size - 1
    tokens = torch.where(torch.arange(T, device=device) % 1000 == 999, eot, 0)  # documents of 1000 tokens
    mask, _ = attention_masks(document_ids(tokens, eot), window_tensor(0, args, device))
    x, x0, ve = (torch.ones(shape, dtype=torch.bfloat16, device=device, requires_grad=True)
                 for shape in [(1, T, args.model_dim), (1, T, args.model_dim), (T, args.model_dim)])
    for block, takes_ve in blocks:
        block(x, ve if takes_ve else None, x0, mask).float().sum().backward()
    if head_loss is head_loss_fp8_hopper:  # its kernels only: its compiled steps are bound to a chunk's shape
        n, V = 256, next_multiple(args.vocab_size, 128)
        x_q, w_q = (torch.zeros(rows, args.model_dim, device=device).to(torch.float8_e4m3fn) for rows in (n, V))
        logits, sums = _logits_gluon(x_q, w_q)
        g_t = torch.empty(V, 2 * n, dtype=torch.float8_e5m2, device=device)[:, :n]  # a chunk of a span's, as a step's
        _loss_and_logit_grad_triton(logits, torch.zeros(n, dtype=torch.int64, device=device), 1 / n, 1.0, g_t, sums)


def warm_up(model: nn.Module, raw_model: nn.Module, adam: torch.optim.Adam, muon: Muon, args: Hyperparameters,
            rank: int, world_size: int, device: torch.device):
    """Compile and run warmup_steps training steps and one validation step on random tokens, untimed, then
    restore the initial weights and optimizer state. The first step compiles; the second runs with the
    optimizers' state, so that the first timed step compiles nothing. Meanwhile a thread compiles our GPU
    kernels (precompile_kernels)."""
    # only where the masks are our kernels': building FlexAttention's block masks writes torch.fx's tracing state,
    # which is the process's, not a thread's, while the main thread traces the model
    precompile = args.warmup_steps and device.type == "cuda" and attention_masks is document_windows
    with ThreadPoolExecutor(1) as pool:
        precompiled = pool.submit(precompile_kernels, block_kinds(raw_model), args, device) if precompile else None
        # kept on the CPU: a GPU copy would add the weights' size to the peak memory
        initial = dict(model={name: t.to("cpu", copy=True) for name, t in raw_model.state_dict().items()},
                       adam=copy.deepcopy(adam.state_dict()), muon=copy.deepcopy(muon.state_dict()))
        local_tokens = args.batch_seqs * args.seq_len // world_size
        generator = torch.Generator().manual_seed(args.seed)
        for step in range(args.warmup_steps):
            dummy = torch.randint(0, args.vocab_size, (local_tokens + 1,), generator=generator, dtype=torch.int32)
            set_schedule(adam, muon, step, args)
            train_step(model, *batch_to_device(dummy, device), window_tensor(step, args, device), args.seq_len,
                       adam, muon)
        if args.warmup_steps:
            one_val_step = dataclasses.replace(args, val_tokens=world_size * args.seq_len)
            dummy = torch.randint(0, args.vocab_size, (one_val_step.val_tokens + 1,), generator=generator)
            evaluate(model, dummy, window_tensor(0, args, device), one_val_step, rank, world_size, device)
        if precompiled is not None:
            precompiled.result()  # raises what the thread raised
    raw_model.load_state_dict(initial["model"])
    adam.load_state_dict(initial["adam"])
    muon.load_state_dict(initial["muon"])


def train(model: nn.Module, raw_model: nn.Module, adam: torch.optim.Adam, muon: Muon, loader: TrainLoader,
          val_tokens: Tensor, args: Hyperparameters, rank: int, world_size: int, device: torch.device, log: Logger,
          checkpoint_dir: Path, start_step: int, train_time_ms: float, stops: "Stops"):
    """The timed loop: evaluate every val_every steps and at the end, time every training step with the GPU
    synchronised (the loss's .item() waits for it), stop on a non-finite loss, save checkpoints. A SIGINT or
    SIGTERM stops it at the start of a step (Stops)."""
    num_steps = args.num_iterations
    profiler = None
    stops.wait_for_step = True
    for step in range(start_step, num_steps + 1):
        stops.check()
        window = window_tensor(step, args, device)
        if step == num_steps or (args.val_every and step % args.val_every == 0):
            val_loss = evaluate(model, val_tokens, window, args, rank, world_size, device)
            log(f"step:{step}/{num_steps} val_loss:{val_loss:.4f} train_time:{train_time_ms:.0f}ms "
                f"step_avg:{train_time_ms / max(step, 1):.2f}ms")
        if step == num_steps:
            break
        if step == args.profile_at > 0:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                              + [torch.profiler.ProfilerActivity.CUDA] * (device.type == "cuda"))
            profiler.start()
        t0 = time.perf_counter()
        set_schedule(adam, muon, step, args)
        inputs, targets = loader.next_batch()
        loss = train_step(model, inputs, targets, window, args.seq_len, adam, muon).item()
        train_time_ms += 1000 * (time.perf_counter() - t0)
        stops.step = step + 1
        log(f"step:{step + 1}/{num_steps} train_loss:{loss:.4f} train_time:{train_time_ms:.0f}ms "
            f"step_avg:{train_time_ms / (step + 1):.2f}ms")
        if not math.isfinite(loss):
            message = f"step {step + 1}: the train loss is {loss}; stopping"
            if args.checkpoint_every:
                path = checkpoint_dir / f"step_{step + 1:06d}_nonfinite.pt"
                save_checkpoint(path, args, step + 1, train_time_ms, raw_model, adam, muon, loader, rank)
                message += f" (state after the step saved to {path})"
            log(message + (f"; resume from the last good checkpoint, {stops.checkpoint}" if stops.checkpoint
                           else "; there is no earlier checkpoint to resume from"))
            if dist.is_initialized():
                dist.barrier()  # every rank exits together, once rank 0 has written the checkpoint and the line
                dist.destroy_process_group()
            stops.wait_for_step = True  # torchrun ends the slower ranks once one exits: that signal is only noted
            raise SystemExit(1)
        if profiler is not None and step + 1 in (args.profile_at + PROFILED_STEPS, num_steps):
            profiler.stop()
            if log.path is not None:
                # fewer than PROFILED_STEPS when the run ends first
                write_profile(profiler, log.path.with_suffix(".profile.tsv"), step + 1 - args.profile_at)
                log(f"profile of steps {args.profile_at + 1}..{step + 1}: {log.path.with_suffix('.profile.tsv')}")
            profiler = None
        if args.checkpoint_every and ((step + 1) % args.checkpoint_every == 0 or step + 1 == num_steps):
            path = checkpoint_dir / f"step_{step + 1:06d}.pt"
            save_checkpoint(path, args, step + 1, train_time_ms, raw_model, adam, muon, loader, rank)
            stops.checkpoint = path
            log(f"checkpoint: {path}")
    stops.wait_for_step = False
    stops.check()


def main(argv: list[str], stops: "Stops"):
    """The run. stops gets its SIGINT and SIGTERM handlers here, and keeps where the run is, for the line that
    stops.exit_code writes if it ends early."""
    stops.install()
    args = parse_args(argv)
    rank, world_size, device = setup_distributed(args.collective_timeout)
    if args.compile and device.type == "cuda":
        # inductor's compile workers take seconds to start, and until they are up it compiles in this process, one
        # kernel after another: start them now, beside the data checks and the model's construction
        torch._inductor.async_compile.maybe_warm_pool()
    check_config(args, world_size)
    train_files, val_file, fingerprint, smoke_note = prepare_data(args)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, args)
        check_resumed_data(ckpt, fingerprint)
        stops.step, stops.checkpoint = ckpt["step"], ckpt["path"]
        kept = {name: ckpt["args"][name] for name in RESUMED_FIELDS if name not in given_names(argv)}
        args = dataclasses.replace(args, **kept)
    run_id = uuid.uuid4().hex[:12]
    log = start_log(args, rank, world_size, device, run_id)
    stops.log = log
    for line in [smoke_note, *bind_ops(args, device)]:
        if line:
            log(line)
    if device.type == "cuda":
        torch._inductor.config.coordinate_descent_tuning = args.coordinate_descent_tuning  # the record had it on

    raw_model = build_model(args, device)
    adam, muon = build_optimizers(raw_model, args, rank, world_size)
    model = torch.compile(raw_model, dynamic=False) if args.compile else raw_model
    log(warm_up_note(args))
    t0 = time.perf_counter()
    warm_up(model, raw_model, adam, muon, args, rank, world_size, device)
    start_step, train_time_ms, loader_state = 0, 0.0, dict(shard=0, pos=0)
    if ckpt is not None:
        restore_checkpoint(ckpt, raw_model, adam, muon, rank)
        start_step, train_time_ms, loader_state = ckpt["step"], ckpt["train_time_ms"], ckpt["loader"]
        log(f"resumed from {ckpt['path']} at step {start_step}")
        if args.checkpoint_every:
            log(f"checkpoints: every {args.checkpoint_every} steps, into {Path(args.checkpoint_dir) / run_id}")
        del ckpt
    if device.type == "cuda":
        torch.cuda.synchronize()
    steps = f"{args.warmup_steps} untimed step" + "s" * (args.warmup_steps != 1)
    log(f"warmup_time:{time.perf_counter() - t0:.1f}s ({'compile and ' * args.compile}{steps})")

    loader = TrainLoader(train_files, args.batch_seqs * args.seq_len, rank, world_size, device, **loader_state,
                         fingerprint=fingerprint)
    val_tokens = load_shard(val_file, pin=device.type == "cuda", max_tokens=args.val_tokens + 1)
    train(model, raw_model, adam, muon, loader, val_tokens, args, rank, world_size, device, log,
          Path(args.checkpoint_dir) / run_id, start_step, train_time_ms, stops)
    if device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB "
            f"reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    log(f"log: {log.path}")
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Around the run: the command line, launch checks, smoke data, checkpoints, stops and profiles


class ConfigError(ValueError):
    """A bad command line or an inconsistent configuration; the message says what to change."""


def _convert(name: str, text: str, kind: type):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} takes a boolean (1/0, true/false), not {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"--{name} takes {kind.__name__} values, not {text!r}") from None


class Rule(NamedTuple):
    holds: Callable[[object], bool]
    says: str  # what the field takes, in the error's words


def _plain_name(text: str) -> bool:
    return text not in (".", "..") and all(c.isascii() and (c.isalnum() or c in "._-") for c in text)


POSITIVE = Rule(lambda v: v > 0, "a positive integer")
NON_NEGATIVE = Rule(lambda v: v >= 0, "a non-negative integer")
LEARNING_RATE = Rule(lambda v: 0 < v < math.inf, "a positive finite number")
MOMENTUM = Rule(lambda v: 0 <= v < 1, "in [0, 1)")
NOT_EMPTY = Rule(bool, "non-empty")
# What parse_args accepts for each field but the switches (_convert takes only booleans for those). NON_NEGATIVE
# fields take 0 to mean none or off; the fields that must agree with each other and the world size, check_config.
FIELD_RULES = dict(
    train_files=NOT_EMPTY, val_files=NOT_EMPTY, val_tokens=POSITIVE, batch_seqs=POSITIVE,
    seq_len=Rule(lambda v: v > 0 and v % BLOCK_SIZE == 0, f"a positive multiple of the attention block size "
                                                           f"{BLOCK_SIZE}"),
    vocab_size=Rule(lambda v: v >= 2, "at least 2 (the last token ends a document)"),
    num_layers=Rule(lambda v: v > 0 and v % 2 == 0, "a positive even integer (the U-Net pairs encoder and decoder "
                                                    "layers)"),
    num_heads=POSITIVE, model_dim=POSITIVE, num_iterations=POSITIVE,
    cooldown_frac=Rule(lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
    window_tokens=POSITIVE, val_every=NON_NEGATIVE,
    muon_lr=LEARNING_RATE, muon_momentum_start=MOMENTUM, muon_momentum_end=MOMENTUM, muon_momentum_steps=POSITIVE,
    head_lr=LEARNING_RATE, embed_lr=LEARNING_RATE, scalar_lr=LEARNING_RATE,
    warmup_steps=NON_NEGATIVE, seed=Rule(lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    tag=Rule(lambda v: v == "" or _plain_name(v), "a plain name: letters, digits, '.', '_' and '-', not '.' or '..' "
                                                  "(the log goes to records/<tag>/)"),
    checkpoint_every=NON_NEGATIVE, checkpoint_dir=NOT_EMPTY, collective_timeout=POSITIVE,
    resume=Rule(lambda v: True, "a checkpoint or a folder of them"),  # load_checkpoint checks it
    profile_at=NON_NEGATIVE,
    preset=Rule(lambda v: v in ("", *PRESETS), f"one of: {', '.join(PRESETS)}"),
)


def check_fields(args: Hyperparameters):
    """Each field against its rule in FIELD_RULES: one error names every field that breaks its rule."""
    problems = [f"--{name}={getattr(args, name)}: must be {rule.says}" for name, rule in FIELD_RULES.items()
                if not rule.holds(getattr(args, name))]
    if problems:
        raise ConfigError("; ".join(problems))


def given_names(argv: list[str]) -> set[str]:
    """The hyperparameters a command line sets."""
    return {arg.removeprefix("--").partition("=")[0] for arg in argv}


def parse_args(argv: list[str]) -> Hyperparameters:
    """--name=value for any Hyperparameters field; --preset=NAME first applies a preset. Every field is checked
    against its rule."""
    types = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}
    overrides = {}
    for arg in argv:
        name, eq, text = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not eq:
            raise ConfigError(f"bad argument {arg!r}: arguments are --name=value, e.g. --num_iterations=100")
        if name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else f"; the names are: {', '.join(types)}"
            raise ConfigError(f"unknown hyperparameter --{name}{hint}")
        overrides[name] = _convert(name, text, types[name])
    args = Hyperparameters(**{**PRESETS.get(overrides.get("preset", ""), {}), **overrides})
    check_fields(args)
    return args


def process_counts(args: Hyperparameters) -> list[int]:
    """The numbers of processes a run of these hyperparameters can use: each holds whole sequences of a step, and
    of a validation step."""
    return [n for n in range(1, args.batch_seqs + 1)
            if args.batch_seqs % n == 0 and args.val_tokens % (n * args.seq_len) == 0]


def _alternatives(numbers: list[int]) -> str:
    """[1, 2, 4, 8] -> '1, 2, 4 or 8'."""
    *rest, last = map(str, numbers)
    return f"{', '.join(rest)} or {last}" if rest else last


def log_folder(args: Hyperparameters) -> Path:
    return Path("records") / (args.tag or f"{date.today():%Y-%m-%d}_run")


def _unwritable(folder: Path) -> str:
    """Why the folder can't be made or written to ('' when it can), from the nearest part of it that exists."""
    existing = folder
    while not (existing.exists() or existing.is_symlink()):
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a folder"
    return "" if os.access(existing, os.W_OK | os.X_OK) else f"{existing} is not writable"


def check_config(args: Hyperparameters, world_size: int):
    """Catch the configurations that would otherwise fail later, or compute something else: the fields that must
    agree with each other and the world size, and the folders the run writes to."""
    problems = []
    counts = process_counts(args)
    use = f": use {_alternatives(counts)} process{'es' * (counts != [1])}" if counts else ""
    if args.batch_seqs % world_size:
        problems.append(f"batch_seqs={args.batch_seqs} sequences can't be shared out evenly over {world_size} "
                        f"ranks{use}")
    elif args.val_tokens % (world_size * args.seq_len):  # not both: the first would bring the second
        problems.append(f"val_tokens={args.val_tokens} must be a multiple of world_size x seq_len "
                        f"= {world_size * args.seq_len}{use}")
    if args.model_dim % (4 * args.num_heads):
        problems.append(f"model_dim={args.model_dim} must be a multiple of 4 x num_heads = {4 * args.num_heads}: "
                        f"the rotary embedding works on quarters of a head")
    folders = {"the log": log_folder(args)}
    if args.checkpoint_every:
        folders["checkpoints"] = Path(args.checkpoint_dir)
    for what, folder in folders.items():
        if why := _unwritable(folder):
            problems.append(f"can't write {what} into {folder}: {why}")
    if problems:
        raise ConfigError("; ".join(problems))


DOWNLOAD_HINT = "python data/cached_fineweb10B.py {n} (synthetic shards: python data/synthetic.py)"


def _checked_header(path: str, hint: str) -> int:
    try:
        return read_shard_header(path)
    except DataError as e:
        raise DataError(f"{e}; delete it and get it again: {hint}") from None


def check_data(args: Hyperparameters, fixed: str = "") -> tuple[list[str], str, list[tuple]]:
    """Check, before anything is compiled, that the shards exist, are whole, hold enough tokens and, those the run
    reads, no token id outside the vocabulary. Returns the train files, the val file and the data's fingerprint:
    (path, size, sha256) of each shard the run reads, which checkpoints record and --resume compares. `fixed`, for
    data that can't grow (the smoke preset's), says what to do instead of getting more."""
    batch_tokens = args.batch_seqs * args.seq_len
    shards_needed = math.ceil(args.num_iterations / batches_in_shard(100_000_000, batch_tokens))
    hint = DOWNLOAD_HINT.format(n=shards_needed)
    train_files = sorted(glob.glob(args.train_files))
    folder = Path(args.train_files).parent
    if not folder.is_dir():
        raise DataError(f"no data folder {folder.resolve()} (train_files={args.train_files}); get the data: {hint}")
    if not train_files:
        raise DataError(f"no train shards match {args.train_files} in {Path.cwd()}; get the data: {hint}")
    shard_steps = [batches_in_shard(_checked_header(file, hint), batch_tokens) for file in train_files]
    steps = sum(shard_steps)
    if steps < args.num_iterations:
        raise DataError(f"the {len(train_files)} shards matching {args.train_files} feed {steps} steps of "
                        f"{batch_tokens:,} tokens, and num_iterations={args.num_iterations}: "
                        f"{fixed or f'get more: {hint}'}")
    val_files = sorted(glob.glob(args.val_files))
    if not val_files:
        raise DataError(f"no val shard matches {args.val_files} in {Path.cwd()}; get the data: {hint}")
    if _checked_header(val_files[0], hint) < args.val_tokens + 1:
        raise DataError(f"{val_files[0]} holds fewer than val_tokens + 1 = {args.val_tokens + 1:,} tokens; "
                        f"{fixed or f'get the full val shard ({hint}) or lower --val_tokens'}")
    files, fed = [], 0  # the train shards the run reads, the first that feed num_iterations steps, and the val shard
    for file, feeds in zip(train_files, shard_steps):
        if fed < args.num_iterations:
            files, fed = files + [file], fed + feeds
    files.append(val_files[0])
    with ThreadPoolExecutor(min(len(files), len(os.sched_getaffinity(0)))) as pool:
        scans = list(pool.map(scan_shard, files))
    for file, (_, largest, _) in zip(files, scans):
        if largest >= args.vocab_size:
            raise DataError(f"{file}: token ids up to {largest}, and vocab_size={args.vocab_size}: a shard of another "
                            f"tokenizer, or the wrong --vocab_size")
    return train_files, val_files[0], [(file, size, digest) for file, (size, _, digest) in zip(files, scans)]


def prepare_data(args: Hyperparameters) -> tuple[list[str], str, list[tuple], str]:
    """Check the data before anything is compiled, once a node: its LOCAL_RANK 0 reads the shards while the others
    wait, and every rank refuses when any node does, or when the nodes' data differ. The smoke preset, reading its
    own folder, first makes it there if it is missing (ready_smoke_data). Returns the train files, the val file,
    the data's fingerprint and a line for the log about the smoke data."""
    error, found, note = "", None, ""
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        try:
            smoke = reads_smoke_data(args)
            note = ready_smoke_data(args) if smoke else ""
            found = check_data(args, fixed=SMOKE_FIXED if smoke else "")
        except DataError as e:
            error = str(e)
    if dist.is_initialized():
        # every node's outcome to every rank: this collective is also where a node's other ranks wait
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, (error, found, note))
        errors = [e for e, _, _ in outcomes if e]
        if not errors:  # each node read its own copy of the data: they must be the same
            nodes = {r: theirs[2] for r, (_, theirs, _) in enumerate(outcomes) if theirs}
            errors = [f"the data of rank {r}'s node differs from rank 0's: {data_difference(nodes[0], fingerprint)}"
                      for r, fingerprint in nodes.items() if fingerprint != nodes[0]]
        error = errors[0] if errors else ""
        _, found, note = outcomes[dist.get_rank() - int(os.environ["LOCAL_RANK"])]  # from this node's first rank
    if error:
        raise DataError(error)
    return *found, note


def check_launch(argv: list[str], world_size: int):
    """What ./run.sh runs in one process before it starts torchrun: the command line, the configuration for
    world_size processes, the data (the smoke preset makes its own first) and the checkpoint to resume."""
    if world_size < 1:
        raise ConfigError(f"--check={world_size}: must be a positive integer (the number of processes)")
    args = parse_args(argv)
    check_config(args, world_size)
    *_, fingerprint, note = prepare_data(args)
    if args.resume:
        ckpt = load_checkpoint(args.resume, args)
        check_resumed_data(ckpt, fingerprint)
    if note.startswith("smoke data: made"):
        print(note)


SMOKE_MADE = "made_by_smoke_preset.txt"  # in the smoke data folder: "sha256  name" of each shard (sha256sum -c)
SMOKE_FIXED = ("the smoke preset's data is fixed: lower --num_iterations, --batch_seqs or --val_tokens, or train on "
               "other shards (--train_files, --val_files)")


def reads_smoke_data(args: Hyperparameters) -> bool:
    return args.preset == "smoke" and {Path(args.train_files).parent, Path(args.val_files).parent} == {SMOKE_DATA}


def ready_smoke_data(args: Hyperparameters) -> str:
    """The smoke preset's folder, SMOKE_DATA: made when missing, refused when not as made; never written over.
    Returns a line for the log."""
    if args.vocab_size != SMOKE_VOCAB:
        raise DataError(f"the smoke preset's data in {SMOKE_DATA} is for vocab_size={SMOKE_VOCAB}, not "
                        f"{args.vocab_size}: drop --vocab_size, or train on other shards (--train_files, --val_files)")
    if not SMOKE_DATA.exists():
        make_smoke_data(SMOKE_DATA)
        return f"smoke data: made by data/synthetic.py into {SMOKE_DATA}"
    altered = altered_smoke_file(SMOKE_DATA)
    if altered:
        raise DataError(f"{SMOKE_DATA} is not as the smoke preset made it ({altered}); delete it, and the next run "
                        f"makes it anew: rm -r {SMOKE_DATA}")
    return f"smoke data: the preset's own, in {SMOKE_DATA}"


def make_smoke_data(folder: Path):
    """SMOKE_SHARDS, each one piece of data/synthetic.py's generator, and the list of what was made, into a
    temporary folder renamed to `folder` when complete: an interrupted make leaves nothing under that name. Where
    another process made the folder first, theirs is kept."""
    spec = importlib.util.spec_from_file_location("synthetic", REPO / "data/synthetic.py")
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True)
    try:
        for name, count in SMOKE_SHARDS.items():
            header = np.zeros(HEADER_INTS, dtype="<i4")
            header[:3] = SHARD_MAGIC, SHARD_VERSION, count
            tokens = synthetic.chunk_tokens(SMOKE_SEED, name, 0, count, SMOKE_VOCAB - 1, SMOKE_VOCAB - 1)
            (tmp / name).write_bytes(header.tobytes() + tokens.tobytes())
        (tmp / SMOKE_MADE).write_text("".join(f"{_sha256(tmp / name)}  {name}\n" for name in SMOKE_SHARDS))
        try:
            tmp.rename(folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def altered_smoke_file(folder: Path) -> str:
    """The first file of the smoke folder that is not as the preset made it, and how; "" when all are."""
    if not (folder / SMOKE_MADE).is_file():
        return f"{SMOKE_MADE} is missing"
    lines = (folder / SMOKE_MADE).read_text(errors="replace").splitlines()
    made = {name: sha for sha, _, name in (line.partition("  ") for line in lines)}
    for name in SMOKE_SHARDS:
        if not (folder / name).is_file():
            return f"{name} is missing"
        if made.get(name) != _sha256(folder / name):
            return f"{name} has changed"
    extra = sorted(f.name for f in folder.iterdir() if f.name not in {*SMOKE_SHARDS, SMOKE_MADE})
    return f"{extra[0]} was not made by it" if extra else ""


# Fields that only say how a run is carried out: a checkpoint may be resumed with other values for them.
RUN_FIELDS = {"fused_mlp", "fused_qkv", "fused_attention", "compile", "coordinate_descent_tuning", "warmup_steps",
              "tag", "checkpoint_every", "checkpoint_dir", "resume", "profile_at", "preset", "collective_timeout"}
# Of those, what a resumed run takes from its checkpoint unless the command line sets it: it goes on as it was.
RESUMED_FIELDS = ("checkpoint_every", "checkpoint_dir", "tag")


def muon_owners(muon: Muon):
    """(parameter, owner rank) of every Muon parameter."""
    for group in muon.param_groups:
        for i, p in enumerate(group["params"]):
            yield p, muon.owner(i)


CHECKSUMMED = ("args", "step", "train_time_ms", "model", "adam", "muon", "loader", "rng", "cuda_rng",
               "data_fingerprint")


def state_digest(state: dict) -> str:
    """sha256 of a checkpoint's CHECKSUMMED parts, in that order: every tensor's dtype, shape and bytes, every other
    value's repr. torch.load does not check the zip's CRCs: a flipped byte in a tensor would load."""
    digest = hashlib.sha256()

    def add(value):
        if isinstance(value, Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            for key, item in value.items():
                digest.update(repr(key).encode())
                add(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            digest.update(repr(value).encode())

    for key in CHECKSUMMED:
        add(state[key])
    return digest.hexdigest()


def save_checkpoint(path: Path, args: Hyperparameters, step: int, train_time_ms: float, model: nn.Module,
                    adam: torch.optim.Adam, muon: Muon, loader: TrainLoader, rank: int):
    """Rank 0 writes the full state and its checksum atomically and durably: a temporary file, synced, renamed,
    then the folder synced. A write that fails (a full disk) removes the temporary file, and every rank raises
    RunError, which names the path. Muon's momentum buffers live on their owner rank, so they are first broadcast
    to all: a checkpoint does not depend on the world size. Collective: every rank must call it."""
    for p, owner in muon_owners(muon):
        state = muon.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        if dist.is_initialized():
            dist.broadcast(state["momentum_buffer"], src=owner)
    failure = None
    if rank == 0:
        state = dict(args=dataclasses.asdict(args), step=step, train_time_ms=train_time_ms,
                     model=model.state_dict(), adam=adam.state_dict(), muon=muon.state_dict(),
                     loader=loader.state(), rng=torch.get_rng_state(),
                     cuda_rng=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)
        state["data_fingerprint"] = loader.fingerprint  # the shards it trained on, which --resume compares
        state["sha256"] = state_digest(state)
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            folder = os.open(path.parent, os.O_RDONLY)  # the rename lasts once the folder is synced
            try:
                os.fsync(folder)
            finally:
                os.close(folder)
        except BaseException as e:  # also a signal's exception: no .tmp is left behind
            tmp.unlink(missing_ok=True)
            if not isinstance(e, (OSError, RuntimeError)):
                raise
            failure = f"could not write checkpoint {path}: {write_error_reason(e)}"
    if dist.is_initialized():  # the others learn whether rank 0 wrote it, so that every rank stops if not
        failed = torch.tensor(failure is not None, dtype=torch.int32, device=model.lm_head.weight.device)
        dist.broadcast(failed, 0)
        failure = failure or (f"rank 0 could not write checkpoint {path}" if failed.item() else None)
    if failure:
        raise RunError(failure)
    drop_others_muon_state(muon, rank)


def write_error_reason(error: BaseException) -> str:
    """Why a write failed: the OSError's reason ("No space left on device"), also where torch's zip writer reports
    it as "unexpected pos", with the OSError as the context; else the error's first line."""
    cause = error
    while not isinstance(cause, OSError) and cause.__context__ is not None:
        cause = cause.__context__
    return cause.strerror if isinstance(cause, OSError) and cause.strerror else str(error).splitlines()[0]


def drop_others_muon_state(muon: Muon, rank: int):
    """Keep only the momentum buffers of the parameters this rank updates."""
    for p, owner in muon_owners(muon):
        if owner != rank:
            del muon.state[p]


CHECKPOINT_NAME = "step_" + "[0-9]" * 6 + ".pt"  # not the _nonfinite ones, nor a save's .tmp file


def checkpoints_beside(path: Path) -> str:
    found = sorted(p.name for p in path.parent.glob(CHECKPOINT_NAME)) if path.parent.is_dir() else []
    return f"checkpoints beside it: {', '.join(found)}" if found else f"no checkpoint in {path.parent}"


def find_checkpoint(path: str) -> Path:
    """--resume's file; for a folder, its newest checkpoint."""
    if Path(path).is_dir():
        found = sorted(Path(path).glob(CHECKPOINT_NAME))
        if not found:
            raise ConfigError(f"--resume={path}: a folder with no checkpoint (step_NNNNNN.pt) in it")
        return found[-1]
    if not Path(path).is_file():
        raise ConfigError(f"--resume={path}: no such file; {checkpoints_beside(Path(path))}")
    return Path(path)


def load_checkpoint(path: str, args: Hyperparameters) -> dict:
    """Read a checkpoint and refuse it when it was made with other hyperparameters than this run's."""
    file = find_checkpoint(path)
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=False)
        ckpt["args"], ckpt["model"], ckpt["step"]
    except Exception as e:  # a damaged file fails in many ways: the zip reader, the unpickler, a missing key
        raise ConfigError(f"--resume={path}: {file} is not a readable checkpoint ({type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}); {checkpoints_beside(file)}") from None
    if "sha256" not in ckpt or not set(CHECKSUMMED) <= ckpt.keys() or ckpt["sha256"] != state_digest(ckpt):
        damage = "its content fails its checksum" if "sha256" in ckpt else "no checksum: an older train_gpt.py saved it"
        raise ConfigError(f"--resume={path}: {file} is damaged ({damage}); {checkpoints_beside(file)}")
    ckpt["path"] = file
    ours = dataclasses.asdict(args)
    diff = [f"{k}: checkpoint {v!r}, now {ours.get(k)!r}" for k, v in ckpt["args"].items()
            if k not in RUN_FIELDS and ours.get(k) != v]
    if diff:
        raise ConfigError(f"--resume={file} was made with other hyperparameters; run with the checkpoint's "
                          f"values to continue it: " + "; ".join(diff))
    return ckpt


def restore_checkpoint(ckpt: dict, model: nn.Module, adam: torch.optim.Adam, muon: Muon, rank: int):
    model.load_state_dict(ckpt["model"])
    adam.load_state_dict(ckpt["adam"])
    muon.load_state_dict(ckpt["muon"])
    drop_others_muon_state(muon, rank)
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(ckpt["cuda_rng"])


def data_difference(before: list[tuple], now: list[tuple]) -> str:
    """The first shard in which two fingerprints (check_data's) differ, and how; "" when they are the same."""
    current = {path: (size, digest) for path, size, digest in now}
    for path, size, digest in before:
        if path not in current:
            return f"{path}: missing"
        if current[path][0] != size:
            return f"{path}: {current[path][0]:,} bytes, not {size:,}"
        if current[path][1] != digest:
            return f"{path}: other content (same size, another sha256)"
    known = {path for path, _, _ in before}
    extra = [path for path, _, _ in now if path not in known]
    return f"{extra[0]}: a shard more" if extra else ""


def check_resumed_data(ckpt: dict, fingerprint: list[tuple]):
    """Refuse to resume a checkpoint on other data than it trained on. load_checkpoint has refused those that
    record no fingerprint: it is one of the checksummed parts."""
    difference = data_difference(ckpt["data_fingerprint"], fingerprint)
    if difference:
        raise DataError(f"--resume={ckpt['path']} trained on other data: {difference}; resume it on its own data")


class RunError(Exception):
    """The run cannot go on: a checkpoint or the log it cannot write. Rank 0 says why in one line; exit code 1."""


class Interrupted(BaseException):
    """SIGINT (Ctrl-C) or SIGTERM: rank 0 says at which step and which checkpoint is the last; exit code 128 + the
    signal's number, as a shell reports a process the signal ended (130, 143). Like KeyboardInterrupt, no
    `except Exception` on its way takes it for an error of what it interrupted."""


class Stops:
    """How a run ends early: in one line from rank 0, without a traceback, with an exit code that says why.
    The first SIGINT or SIGTERM raises Interrupted at once, or, inside the training loop (wait_for_step), at the
    start of the next step (check()): there every rank stops after the same step and no checkpoint is half written,
    where a rank that left mid-step would leave the others waiting in a collective. Later signals are only noted:
    torchrun forwards to its workers the Ctrl-C they already got from the terminal. step and checkpoint say where
    the run is, for the line; log writes it (rank 0's Logger, once there is one)."""

    def __init__(self, rank: int):
        self.rank, self.signum, self.wait_for_step = rank, 0, False
        self.step, self.checkpoint, self.log = 0, None, print

    def install(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # as a background job started ignoring Ctrl-C
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame):
        first, self.signum = not self.signum, self.signum or signum
        if first and not self.wait_for_step:
            raise Interrupted()

    def check(self):
        if self.signum:
            raise Interrupted()

    def where(self) -> str:
        return f"at step {self.step}; last checkpoint: {self.checkpoint or 'none'}"

    def exit_code(self, error: BaseException) -> int | None:
        """Say in one line (rank 0) why an exception ends the run, and return its exit code; None for an exception
        that is a bug, whose traceback the caller shows."""
        self.wait_for_step = True  # the process is on its way out: a signal now is only noted
        if self.signum:  # also a collective that failed because another rank stopped first
            line, code = f"interrupted {self.where()}", 128 + self.signum
        elif isinstance(error, RunError):
            line, code = f"error: {error}", 1
        elif isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error)):
            reason = str(error).splitlines()[0].split("] ", 1)[-1].split(". ")[0]  # gloo's, without its source line
            line = (f"error: rank {self.rank} waited longer than --collective_timeout for the others in a collective "
                    f"({reason}): one of them stopped or hangs" if "timed out" in reason.lower() else
                    f"error: a collective failed ({reason}): another rank stopped or died")
            line, code = f"{line}; the run stops {self.where()}", 1
        else:
            return None
        if self.rank == 0:
            if line.startswith("error: "):
                print(line, file=sys.stderr, flush=True)
            else:
                try:
                    self.log(line)
                except RunError:  # the log can't take it: the console still does
                    print(line, flush=True)
        return code


def stop_with_launcher():
    """SIGTERM to this process when its parent, torchrun, dies, by SIGKILL too (which torchrun cannot forward), so
    that no worker trains on alone; the handler then stops the run as for any SIGTERM. Linux only (prctl)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers outlive a killed torchrun, as before
        return
    if os.getppid() == 1:  # torchrun died before the prctl: this process was handed to init
        os.kill(os.getpid(), signal.SIGTERM)


PROFILED_STEPS = 3


def write_profile(profiler: torch.profiler.profile, path: Path, steps: int):
    """Per-step device (GPU) and CPU time of every kernel, op and phase the profiler saw, largest first."""
    rows = sorted(((e.self_device_time_total, e.self_cpu_time_total, e.count, e.key)
                   for e in profiler.key_averages()), reverse=True)
    with path.open("w") as f:
        print(f"# {steps} steps profiled; per step: self device us, self cpu us, calls, name", file=f)
        for device_us, cpu_us, count, name in rows:
            print(f"{device_us / steps:.1f}\t{cpu_us / steps:.1f}\t{count / steps:g}\t{name}", file=f)


# ----------------------------------------------------------------------------------------------------------------
# Ops and their implementations
# The model calls ops by name: attention_masks, attention_block (the qkv matmul, attention_inputs, attention),
# residual_projection, relu2_mlp and head_loss. bind_ops() binds each of these seven names once a run, from the run's
# switches and what the device can do; until then they name the plain implementations, which run anywhere (the end of
# this section). Each op's section holds, in this order: its tile settings, its implementations, its plain-PyTorch
# reference (what the CPU runs, and what the tests compare the kernels with), its custom ops with their fakes, their
# launchers, and their Triton kernels.


class Tile(NamedTuple):
    """A Triton kernel's launch settings: the block a program works on, in the order of the kernel's own names for
    its dimensions, its warps and its pipeline stages."""
    block: tuple[int, ...]
    warps: int
    stages: int


LOG2E = math.log2(math.e)  # the kernels take exp2 of their arguments times log2(e)


@triton.jit
def _bf16(x):
    """float32 -> bf16, rounded to nearest (ties to even) as .to(bfloat16) rounds, two at a time by the packed
    conversion instruction (F2FP in SASS), where Triton's conversion takes one instruction a value (F2F)."""
    return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,r,r", [x], dtype=tl.bfloat16,
                                     is_pure=True, pack=2)


@triton.jit
def _f32_of_bf16(x):
    """bf16 -> float32 (exact), two at a time: the first value shifted up, the second masked, an instruction each,
    where Triton's conversion takes two for the second (a permute, then the shift)."""
    return tl.inline_asm_elementwise("{ shl.b32 $0, $2, 16; and.b32 $1, $2, 0xffff0000; }", "=r,=r,r", [x],
                                     dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _add_bf16(a, b):
    """a + b of bf16 a and b, in bf16, two at a time by the packed bf16 add: the same bits as adding in float32 and
    rounding, since that float32 sum is exact unless one term is under 2^-16 of the other, which then moves neither
    rounding off the larger. Where the float32 path unpacks both, adds and packs again, this takes one instruction
    for two values."""
    return tl.inline_asm_elementwise("add.rn.bf16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.bfloat16, is_pure=True,
                                     pack=2)


@triton.jit
def _relu_square_bf16(y):
    """relu(y)^2 of bf16 y, in bf16, two at a time by the packed bf16 instructions: the same bits as squaring in
    float32 and rounding, since the square of a bf16 is exact in float32 and both round it once. Where the float32
    path unpacks, compares, multiplies and packs again, this takes one max and one multiply for two values."""
    return tl.inline_asm_elementwise("{ .reg .b32 z, r; mov.b32 z, 0; max.bf16x2 r, $1, z; mul.rn.bf16x2 $0, r, r; }",
                                     "=r,r", [y], dtype=tl.bfloat16, is_pure=True, pack=2)


# The Gluon kernels' TMA copies, by their names before and after Triton 3.7 renamed them
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


def fp8_available(device: torch.device) -> tuple[bool, str]:
    """Whether the FP8 head can run here, and why not."""
    if device.type != "cuda":
        return False, f"no FP8 matmul on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return False, f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor} < 8.9"
    return True, ""


def triton_on_hopper(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels written for Hopper can run here: the MLP's matmuls and the attention kernels load
    through its tensor memory accelerator, and were tuned and tested on it."""
    if device.type != "cuda":
        return False, f"no Triton on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return False, f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor} < 9.0"
    if not HAS_TRITON:
        return False, "Triton is not installed"
    return True, ""


def bind_ops(args: Hyperparameters, device: torch.device) -> list[str]:
    """Bind the op names the model calls to their implementations for this run, from its switches and what the
    device can do. Returns the log's lines: one for each switch that is on but can't be honoured here, then the
    bindings. main() calls it before the model is compiled, which then reads the bound functions."""
    fp8, why_not_fp8 = fp8_available(device)
    hopper, why_not_hopper = triton_on_hopper(device)
    triton_here, why_not_triton = (True, "") if device.type == "cuda" and HAS_TRITON else (False, why_not_hopper)
    gluon_here, why_not_gluon = hopper and HAS_GLUON, why_not_hopper or "this Triton has no Gluon"
    lines = []
    for switch, can, why_not, instead in [
            ("fp8_head", fp8, why_not_fp8, "the lm_head runs in bf16"),
            ("fused_mlp", gluon_here, why_not_gluon, "its matmuls and ReLU^2 run as plain PyTorch"),
            ("fused_qkv", triton_here, why_not_triton, "QK norm, rotary and the value mix run as plain PyTorch"),
            ("fused_attention", hopper, why_not_hopper, "FlexAttention or dense attention runs it")]:
        if getattr(args, switch) and not can:
            lines.append(f"{switch}: off ({why_not}); {instead}")
    if args.fused_attention and hopper:
        masks, attend = document_windows, attention_windows
    elif device.type == "cuda":
        masks, attend = block_masks, attention_flex if args.compile else attention_flex_compiled
    else:
        masks, attend = block_masks, attention_dense  # FlexAttention has no backward on the CPU
    fused_qkv = args.fused_qkv and triton_here
    fused_block = fused_qkv and args.fused_attention and gluon_here  # then attention and attention_inputs go unused
    ops = dict(attention_masks=masks, attention=attend,
               attention_inputs=attention_inputs_fused if fused_qkv else attention_inputs_reference,
               attention_block=attention_block_fused if fused_block else attention_block_reference,
               residual_projection=residual_projection_fused if fused_block else residual_projection_reference,
               relu2_mlp=relu2_mlp_fused if args.fused_mlp and gluon_here else relu2_mlp_reference,
               head_loss=(head_loss_fp8_hopper if gluon_here else head_loss_fp8) if args.fp8_head and fp8
               else head_loss_bf16)
    globals().update(ops)
    return lines + ["ops: " + ", ".join(f"{name}={op.__name__}" for name, op in ops.items())]


# --- attention: on Hopper, Triton kernels that walk each query tile's one range of keys (see document_windows),
# loading tiles through the TMA, and apply the mask only in the tiles at its ends, the diagonal and the one holding
# a document's start; elsewhere on CUDA FlexAttention (its use by @KoszarskyB), which walks the block tables and is
# the kernels' reference; on the CPU dense SDPA.

# Each kernel's tile: (query rows, key rows). Both divide BLOCK_SIZE; the key kernel's query rows divide its key
# rows, the query kernels' key rows their query rows.
ATTENTION_FORWARD = Tile((64, 64), warps=4, stages=3)
ATTENTION_GRAD_Q = Tile((64, 64), warps=4, stages=2)
ATTENTION_GRAD_KV = Tile((64, 64), warps=4, stages=2)


def attention_windows(q: Tensor, k: Tensor, v: Tensor, mask: DocumentWindows) -> Tensor:
    """Softmax attention of q, k, v (1, T, H, head_dim) bf16 under a DocumentWindows mask, scaled by
    ATTENTION_SCALE -> (1, T, H, head_dim), by the Triton kernels below."""
    return WindowAttention.apply(q, k, v, *mask)


def attention_flex(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, attend=flex_attention) -> Tensor:
    """attention under a block mask by FlexAttention, which takes (B, H, T, head_dim), in a compiled model."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return attend(q, k, v, block_mask=mask, scale=ATTENTION_SCALE).transpose(1, 2)


def attention_flex_compiled(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask) -> Tensor:
    """attention_flex outside a compiled model. Uncompiled, flex_attention falls back to a reference that applies
    mask_mod everywhere and ignores the block tables, losing the sliding windows: so it runs compiled on its own."""
    return attention_flex(q, k, v, mask, attend=_flex_attention_compiled)


_flex_attention_compiled = torch.compile(flex_attention, dynamic=False)


def attention_dense(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask) -> Tensor:
    """attention under a block mask as dense SDPA with the mask's (T, T) matrix: the reference."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(mask), scale=ATTENTION_SCALE).transpose(1, 2)


def dense_mask(mask: BlockMask) -> Tensor:
    """A block mask as a (T, T) bool matrix: mask_mod applied inside the kept blocks."""
    pos = torch.arange(mask.seq_lengths[0], device=mask.kv_indices.device)
    kept = mask.to_dense()[0, 0].bool().repeat_interleave(BLOCK_SIZE, 0).repeat_interleave(BLOCK_SIZE, 1)
    return kept & mask.mask_mod(0, 0, pos[:, None], pos[None, :])


class WindowAttention(torch.autograd.Function):
    """attention_windows with the two custom ops below; saves the output and its log-sum-exp."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, starts: Tensor, ends: Tensor, window_blocks: Tensor):
        out, lse = window_attention(q, k, v, starts, window_blocks)
        ctx.save_for_backward(q, k, v, out, lse, starts, ends, window_blocks)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grads = window_attention_grad(grad_out, *ctx.saved_tensors)
        return *grads, None, None, None


def _window_scores(q: Tensor, k: Tensor, starts: Tensor, window_blocks: Tensor) -> Tensor:
    """The reference's scaled scores (B, H, T, T), -inf where DocumentWindows hide a key."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * ATTENTION_SCALE
    return scores.masked_fill(~window_dense_mask(starts, window_blocks), -math.inf)


@torch.library.custom_op("speedrun::window_attention", mutates_args=())
def window_attention(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, window_blocks: Tensor) -> tuple[Tensor, Tensor]:
    """q, k, v (1, T, H, head_dim) bf16 -> the output (1, T, H, head_dim) bf16 and the log-sum-exp of each query's
    scores (H, T) float32, in base 2 (of the scores times log2(e)), as the backward takes it. This body is the
    reference; on CUDA _window_attention_triton runs instead."""
    scores = _window_scores(q.float(), k.float(), starts, window_blocks)
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float())
    return out.bfloat16().contiguous(), (scores.logsumexp(-1)[0] * LOG2E).contiguous()


@window_attention.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, starts: Tensor, window_blocks: Tensor):
    return q.new_empty(q.shape), q.new_empty(q.size(2), q.size(1), dtype=torch.float32)


@torch.library.custom_op("speedrun::window_attention_grad", mutates_args=())
def window_attention_grad(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, starts: Tensor,
                          ends: Tensor, window_blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """window_attention's backward: the gradient of the output -> those of q, k and v. This body is the reference;
    on CUDA _window_attention_grad_triton runs instead."""
    q, k, v, grad_out = (t.float() for t in (q, k, v, grad_out))
    p = _window_scores(q, k, starts, window_blocks).softmax(-1)
    grad_p = torch.einsum("bqhd,bkhd->bhqk", grad_out, v)
    grad_s = p * (grad_p - (grad_p * p).sum(-1, keepdim=True)) * ATTENTION_SCALE  # the softmax's backward
    grads = (torch.einsum("bhqk,bkhd->bqhd", grad_s, k), torch.einsum("bhqk,bqhd->bkhd", grad_s, q),
             torch.einsum("bhqk,bqhd->bkhd", p, grad_out))
    return tuple(g.bfloat16().contiguous() for g in grads)


@window_attention_grad.register_fake
def _(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, starts: Tensor, ends: Tensor,
      window_blocks: Tensor):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _tiles_of(t: Tensor, rows: int) -> "TensorDescriptor":
    """The kernels load their tiles of q, k, v and grad_out (1, T, H, head_dim), contiguous, through the TMA: a
    descriptor of t as (T, H * head_dim) in tiles of rows x head_dim (one head's columns)."""
    return TensorDescriptor.from_tensor(t.view(t.size(1), -1), [rows, t.size(3)])


@window_attention.register_kernel("cuda")
def _window_attention_triton(q: Tensor, k: Tensor, v: Tensor, starts: Tensor,
                             window_blocks: Tensor) -> tuple[Tensor, Tensor]:
    _, T, H, head_dim = q.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    out, lse = torch.empty_like(q), q.new_empty(H, T, dtype=torch.float32)
    (block_m, block_n), warps, stages = ATTENTION_FORWARD
    _window_attention_kernel[(T // block_m, H)](_tiles_of(q, block_m), _tiles_of(k, block_n), _tiles_of(v, block_n),
                                                out, lse, starts, window_blocks, T, ATTENTION_SCALE * LOG2E, H,
                                                head_dim, BLOCK_SIZE, block_m, block_n, num_warps=warps,
                                                num_stages=stages)
    return out, lse


@window_attention_grad.register_kernel("cuda")
def _window_attention_grad_triton(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  starts: Tensor, ends: Tensor, window_blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grads = tuple(q.new_empty(q.shape) for _ in range(3))
    _window_attention_grad_kernels(grad_out, q, k, v, out, lse, starts, ends, window_blocks, grads)
    return grads


def _window_attention_grad_kernels(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                   starts: Tensor, ends: Tensor, window_blocks: Tensor, grads: tuple[Tensor, ...],
                                   inputs: tuple = ()):
    """Launches the query kernel, then the key kernel, which store into grads = (grad_q, grad_k, grad_v). Given
    inputs = (raw_v, rstd, x_scale, ve, lambdas, cos, sin, partial, has_ve), the kernels go on with
    attention_inputs' backward, and grads are (grad_qkv, grad_qkv, grad_ve): see window_attention_inputs_grad."""
    _, T, H, head_dim = q.shape
    grad_out, q, k, v, out = (t.contiguous() for t in (grad_out, q, k, v, out))
    delta = torch.empty_like(lse)  # per query: the sum of grad_out * out, which the query kernel computes and stores
    fused = bool(inputs)
    raw_v, rstd, x_scale, ve, lambdas, cos, sin, partial, has_ve = inputs or (q,) * 8 + (False,)  # placeholders

    def grid(block: int) -> tuple[int, int]:
        # fused, heads first: the H programs of a tile run side by side, and all but the first find its rows of cos
        # and sin (float32, 32 MiB at 64K tokens) in L2. With the tiles first, between two heads' reads of a row
        # would come a head's pass over the sequence, which loads far more than L2 holds (50 MB): each head would
        # read the tables from HBM
        return (H, T // block) if fused else (T // block, H)

    (block_m, block_n), warps, stages = ATTENTION_GRAD_Q
    _window_attention_grad_q_kernel[grid(block_m)](
        _tiles_of(q, block_m), _tiles_of(k, block_n), _tiles_of(v, block_n), _tiles_of(grad_out, block_m), out, lse,
        delta, starts, window_blocks, grads[0], rstd, x_scale, cos, sin, T, ATTENTION_SCALE * LOG2E, ATTENTION_SCALE, H,
        head_dim, BLOCK_SIZE, block_m, block_n, fused, num_warps=warps, num_stages=stages)
    (block_m, block_n), warps, stages = ATTENTION_GRAD_KV
    _window_attention_grad_kv_kernel[grid(block_n)](
        _tiles_of(q, block_m), _tiles_of(k, block_n), _tiles_of(v, block_n), _tiles_of(grad_out, block_m), lse, delta,
        ends, window_blocks, *grads[1:], raw_v, rstd, x_scale, ve, lambdas, cos, sin, partial, T,
        ATTENTION_SCALE * LOG2E, ATTENTION_SCALE, H, head_dim, BLOCK_SIZE, block_m, block_n, fused, has_ve,
        num_warps=warps, num_stages=stages)


@triton.jit
def _key_range(first_start, last_start, m0, window, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keys query tile m0 sees, given its first and last query's document starts, are lo .. m0 + tile:
    lo .. unmasked hold a document start (masked), unmasked .. m0 lie in the tile's one document (no mask), and
    the diagonal from m0 is masked."""
    lo = tl.maximum((m0 // BLOCK - window + 1) * BLOCK, first_start // BLOCK_N * BLOCK_N)
    unmasked = tl.minimum(tl.maximum(lo, tl.cdiv(last_start, BLOCK_N) * BLOCK_N), m0)
    return lo, unmasked


@triton.jit
def _tile_and_head(BLOCK: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """This program's first row and head, of a grid (T // BLOCK, H), or (H, T // BLOCK) with HEADS_FIRST."""
    if HEADS_FIRST:
        row0, head = tl.program_id(1) * BLOCK, tl.program_id(0)
    else:
        row0, head = tl.program_id(0) * BLOCK, tl.program_id(1)
    return row0, head


# Each kernel walks its tile's range of keys (or queries) in one pipelined loop, with a branch that masks only
# the tiles at its ends: at the short windows a range is a tile or two, and one loop fills the pipeline once.


@triton.jit
def _window_attention_kernel(q_desc, k_desc, v_desc, out, lse, starts, window_blocks, T, qk_scale,
                             H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    # one tile of BLOCK_M queries of one head, whose columns start at col, with the online softmax over its key
    # tiles (flash attention's forward, by Tri Dao)
    m0, head = tl.program_id(0) * BLOCK_M, tl.program_id(1)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    cols = tl.arange(0, BLOCK_N)
    q_tile = q_desc.load([m0, col])
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    row_max = tl.full((BLOCK_M,), -float("inf"), dtype=tl.float32)
    for n in tl.range(lo, m0 + BLOCK_M, BLOCK_N):
        keys = n + cols
        scores = tl.dot(q_tile, k_desc.load([n, col]).T)  # unscaled: the maximum is scaled once a row
        if (n < unmasked) | (n >= m0):  # -1e6 rather than -inf: a row with no key in this tile yet stays
            # finite, and its weights are zeroed by the first tile that has one
            seen = (keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None])
            scores = tl.where(seen, scores, -1.0e6)
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        p = tl.math.exp2(scores * qk_scale - new_max[:, None])
        alpha = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        values = v_desc.load([n, col])
        acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values)
        row_max = new_max
    tl.store(out + rows[:, None] * (H * HEAD_DIM) + col + dims[None, :], (acc / row_sum[:, None]).to(q_tile.dtype))
    tl.store(lse + head * T + rows, row_max + tl.math.log2(row_sum))


@triton.jit
def _window_attention_grad_q_kernel(q_desc, k_desc, v_desc, grad_out_desc, out, lse, delta, starts,
                                    window_blocks, grad_q, rstd, x_scale, cos, sin, T, qk_scale, scale,
                                    H: tl.constexpr,
                                    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
                                    BLOCK_N: tl.constexpr, INPUTS: tl.constexpr):
    # one tile of BLOCK_M queries of one head, over the keys it sees, as in the forward; it also stores its
    # queries' delta = sum(grad_out * out) for the key kernel, which runs after it. With INPUTS, grad_q is the
    # gradient of qkv, and the tile's gradient reaches it through attention_inputs' backward of q
    m0, head = _tile_and_head(BLOCK_M, INPUTS)
    rows, dims, col = m0 + tl.arange(0, BLOCK_M), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    cols = tl.arange(0, BLOCK_N)
    at = rows[:, None] * (H * HEAD_DIM) + col + dims[None, :]
    q_tile, grad_o = q_desc.load([m0, col]), grad_out_desc.load([m0, col])
    delta_q = tl.sum(tl.load(out + at).to(tl.float32) * grad_o.to(tl.float32), 1)
    tl.store(delta + head * T + rows, delta_q)
    lse_q = tl.load(lse + head * T + rows)
    starts_q = tl.load(starts + rows)
    window = tl.maximum(tl.load(window_blocks), 1)
    lo, unmasked = _key_range(tl.load(starts + m0), tl.load(starts + m0 + BLOCK_M - 1), m0, window, BLOCK, BLOCK_N)
    grad_q_tile = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    for n in tl.range(lo, m0 + BLOCK_M, BLOCK_N):
        keys = n + cols
        k_tile = k_desc.load([n, col])
        p = tl.math.exp2(tl.dot(q_tile, k_tile.T) * qk_scale - lse_q[:, None])
        if (n < unmasked) | (n >= m0):
            p = tl.where((keys[None, :] >= starts_q[:, None]) & (keys[None, :] <= rows[:, None]), p, 0.0)
        grad_p = tl.dot(grad_o, v_desc.load([n, col]).T)
        grad_s = p * (grad_p - delta_q[:, None])
        grad_q_tile += tl.dot(grad_s.to(k_tile.dtype), k_tile)
    grad_q_tile = (grad_q_tile * scale).to(q_tile.dtype)  # bf16 either way: the separate ops' numbers
    if INPUTS:
        _qk_grad_tile(grad_q_tile, q_tile, rstd, x_scale, cos, sin, grad_q, rows, head, HEAD_DIM, 3 * H)
    else:
        tl.store(grad_q + at, grad_q_tile)


@triton.jit
def _window_attention_grad_kv_kernel(q_desc, k_desc, v_desc, grad_out_desc, lse, delta, ends, window_blocks,
                                     grad_k, grad_v, raw_v, rstd, x_scale, ve, lambdas, cos, sin, partial, T,
                                     qk_scale,
                                     scale, H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, INPUTS: tl.constexpr,
                                     HAS_VE: tl.constexpr):
    # one tile of BLOCK_N keys of one head, over the queries that see them: from the tile itself (masked) to
    # the end of the window or of its last key's document, masked from its first key's document end
    # (flash attention 2's backward, by Tri Dao), with the scores transposed (keys x queries). With INPUTS,
    # grad_k is the gradient of qkv and grad_v that of ve, which the tile's gradients reach through
    # attention_inputs' backward of k and v
    n0, head = _tile_and_head(BLOCK_N, INPUTS)
    keys, dims, col = n0 + tl.arange(0, BLOCK_N), tl.arange(0, HEAD_DIM), head * HEAD_DIM
    cols = tl.arange(0, BLOCK_M)
    lse, delta = lse + head * T, delta + head * T
    k_tile, v_tile = k_desc.load([n0, col]), v_desc.load([n0, col])
    ends_k = tl.load(ends + keys)
    window = tl.maximum(tl.load(window_blocks), 1)
    hi = tl.minimum(tl.minimum((n0 // BLOCK + window) * BLOCK, T), tl.cdiv(tl.load(ends + n0 + BLOCK_N - 1),
                                                                         BLOCK_M) * BLOCK_M)
    unmasked = tl.maximum(tl.minimum(hi, tl.load(ends + n0) // BLOCK_M * BLOCK_M), n0 + BLOCK_N)
    grad_k_tile = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    grad_v_tile = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    for m in tl.range(n0, hi, BLOCK_M):
        rows = m + cols
        q_tile = q_desc.load([m, col])
        p_t = tl.math.exp2(tl.dot(k_tile, q_tile.T) * qk_scale - tl.load(lse + rows)[None, :])
        if (m < n0 + BLOCK_N) | (m >= unmasked):
            p_t = tl.where((rows[None, :] >= keys[:, None]) & (rows[None, :] < ends_k[:, None]), p_t, 0.0)
        grad_o = grad_out_desc.load([m, col])
        grad_v_tile += tl.dot(p_t.to(grad_o.dtype), grad_o)
        grad_p_t = tl.dot(v_tile, grad_o.T)
        grad_s_t = p_t * (grad_p_t - tl.load(delta + rows)[None, :])
        grad_k_tile += tl.dot(grad_s_t.to(q_tile.dtype), q_tile)
    grad_k_tile, grad_v_tile = (grad_k_tile * scale).to(k_tile.dtype), grad_v_tile.to(k_tile.dtype)
    if INPUTS:
        # v's first: k's then has fewer registers live beside k_tile, which spills past the loop (64 bytes a thread,
        # stored once and loaded once, where loading the tile again could come from HBM)
        _v_grad_tile(grad_v_tile, raw_v, x_scale, ve, lambdas, grad_k, grad_v, partial, keys, head, H, HEAD_DIM,
                     HAS_VE)
        _qk_grad_tile(grad_k_tile, k_tile, rstd, x_scale, cos, sin, grad_k, keys, H + head, HEAD_DIM, 3 * H)
    else:
        at = keys[:, None] * (H * HEAD_DIM) + col + dims[None, :]
        tl.store(grad_k + at, grad_k_tile)
        tl.store(grad_v + at, grad_v_tile)


# --- attention_inputs: QK norm, rotary and the value mix, one Triton kernel each way on a CUDA GPU
# Compiled, the plain path is two inductor kernels that move these bytes more slowly: the kernels here read qkv
# (and ve) once and write q, k, v once; the backward reads the three gradients and qkv once and writes the gradient
# of qkv. Rounding: from float32 to bf16 once at the end, as inductor rounds when it fuses the plain path's steps.


# A program's tokens, all heads
QKV = Tile((16,), warps=4, stages=3)


def attention_inputs_fused(qkv: Tensor, ve: Tensor | None, lambdas: Tensor,
                           rotary: Rotary) -> tuple[Tensor, Tensor, Tensor]:
    """attention_inputs_reference by the Triton kernels below."""
    T = qkv.size(1)
    return FusedAttentionInputs.apply(qkv, ve, lambdas, rotary.cos[:T], rotary.sin[:T])


def attention_inputs_reference(qkv: Tensor, ve: Tensor | None, lambdas: Tensor,
                               rotary: Rotary) -> tuple[Tensor, Tensor, Tensor]:
    """qkv (B, T, 3 * H, head_dim) -> q, k, v (B, T, H, head_dim): q and k normed and rotated, v mixed with the
    value embedding ve (B, T, H * head_dim) or (T, H * head_dim) by lambdas."""
    q, k, v = qkv.chunk(3, dim=-2)
    q, k = rotary(norm(q)), rotary(norm(k))  # QK norm by @Grad62304977
    # value embeddings by @KoszarskyB and @Grad62304977; none in the middle layers, by @YouJiacheng
    v = lambdas[0] * v + lambdas[1] * ve.view_as(v) if ve is not None else lambdas[0] * v
    return q, k, v


class FusedAttentionInputs(torch.autograd.Function):
    """attention_inputs_fused with the two custom ops below; saves qkv and ve, and the backward recomputes the norms."""

    @staticmethod
    def forward(ctx, qkv: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor, sin: Tensor):
        ctx.save_for_backward(qkv, ve, lambdas, cos, sin)
        return qkv_prep(qkv, ve, lambdas, cos, sin)

    @staticmethod
    def backward(ctx, grad_q: Tensor, grad_k: Tensor, grad_v: Tensor):
        qkv, ve, lambdas, cos, sin = ctx.saved_tensors
        grad_qkv, grad_ve, grad_lambdas = qkv_prep_grad(grad_q, grad_k, grad_v, qkv, ve, lambdas, cos, sin)
        return grad_qkv, grad_ve if ve is not None else None, grad_lambdas, None, None


@torch.library.custom_op("speedrun::qkv_prep", mutates_args=())
def qkv_prep(qkv: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor,
             sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """attention_inputs' forward: qkv (B, T, 3 * H, head_dim) bf16, lambdas (2,) float32, cos and sin (T,
    head_dim / 2) float32 -> q, k, v (B, T, H, head_dim) bf16. This body is the reference; on CUDA the Triton
    kernel runs instead."""
    x = qkv.float()
    q, k, v = x.chunk(3, dim=-2)
    q, k = (rotate(F.rms_norm(t, (t.size(-1),)), cos, sin).bfloat16() for t in (q, k))
    v = lambdas[0] * v + (lambdas[1] * ve.float().view_as(v) if ve is not None else 0)
    return q.contiguous(), k.contiguous(), v.bfloat16().contiguous()


@qkv_prep.register_fake
def _(qkv: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor, sin: Tensor):
    B, T, H3, head_dim = qkv.shape
    return tuple(qkv.new_empty(B, T, H3 // 3, head_dim) for _ in range(3))


@torch.library.custom_op("speedrun::qkv_prep_grad", mutates_args=())
def qkv_prep_grad(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, qkv: Tensor, ve: Tensor | None, lambdas: Tensor,
                  cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """attention_inputs' backward: the gradients of q, k, v -> those of qkv, of ve (empty without ve) and of
    lambdas. This body is the reference; on CUDA the Triton kernel runs instead."""
    q, k, v = qkv.float().chunk(3, dim=-2)
    rstd_q, rstd_k = qk_rstd(qkv)[..., None].chunk(2, dim=-2)
    return _prep_grad(grad_q, grad_k, grad_v, q * rstd_q, k * rstd_k, rstd_q, rstd_k, v, ve, lambdas, cos, sin)


def qkv_prep_grad_of_outputs(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, q: Tensor, k: Tensor, rstd: Tensor,
                             raw_v: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor,
                             sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """qkv_prep_grad from qkv_prep's outputs q and k (normed and rotated, bf16) and rstd, and qkv's v, raw_v:
    the normed rows come back from q and k by the inverse rotation."""
    normed = [rotate(t.float(), cos, -sin) for t in (q, k)]
    return _prep_grad(grad_q, grad_k, grad_v, *normed, *rstd[..., None].chunk(2, dim=-2), raw_v.float(), ve,
                      lambdas, cos, sin)


def _prep_grad(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, normed_q: Tensor, normed_k: Tensor, rstd_q: Tensor,
               rstd_k: Tensor, v: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor,
               sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """attention_inputs' backward from the normed q and k, float32, their rstd (B, T, H, 1) and qkv's v."""
    grads = []
    for grad, normed, rstd in zip((grad_q, grad_k), (normed_q, normed_k), (rstd_q, rstd_k)):
        grad_normed = rotate(grad.float(), cos, -sin)
        grads.append(rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True)))
    g_v = grad_v.float()
    grad_qkv = torch.cat((*grads, lambdas[0] * g_v), dim=-2).bfloat16().contiguous()
    grad_ve = (lambdas[1] * g_v).bfloat16().reshape(ve.shape) if ve is not None else grad_v.new_empty(0)
    dot_ve = (g_v * ve.float().view_as(g_v)).sum() if ve is not None else g_v.new_zeros(())
    grad_lambdas = torch.stack([(g_v * v).sum(), dot_ve])
    return grad_qkv, grad_ve, grad_lambdas.bfloat16().float()  # bf16, as autograd makes it from bf16 products


@qkv_prep_grad.register_fake
def _(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, qkv: Tensor, ve: Tensor | None, lambdas: Tensor,
      cos: Tensor, sin: Tensor):
    grad_ve = ve.new_empty(ve.shape) if ve is not None else qkv.new_empty(0)
    return qkv.new_empty(qkv.shape), grad_ve, lambdas.new_empty(2)


@qkv_prep.register_kernel("cuda")
def _qkv_prep_triton(qkv: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor,
                     sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T, H3, head_dim = qkv.shape
    (rows,), warps, stages = QKV
    q, k, v = (qkv.new_empty(B, T, H3 // 3, head_dim) for _ in range(3))
    has_ve = ve is not None
    qkv, ve = qkv.contiguous(), ve.contiguous() if has_ve else qkv  # ve: a placeholder when there is none
    _qkv_prep_kernel[(triton.cdiv(B * T, rows),)](qkv, ve, lambdas, cos, sin, q, k, v, B * T, T, has_ve, H3 // 3,
                                                  head_dim, rows, num_warps=warps, num_stages=stages)
    return q, k, v


@qkv_prep_grad.register_kernel("cuda")
def _qkv_prep_grad_triton(grad_q: Tensor, grad_k: Tensor, grad_v: Tensor, qkv: Tensor, ve: Tensor | None,
                          lambdas: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T, H3, head_dim = qkv.shape
    (rows,), warps, stages = QKV
    has_ve = ve is not None
    grad_qkv, grad_ve = qkv.new_empty(qkv.shape), ve.new_empty(ve.shape) if has_ve else qkv.new_empty(0)
    qkv, ve = qkv.contiguous(), ve.contiguous() if has_ve else qkv
    grid = triton.cdiv(B * T, rows)
    partial = lambdas.new_empty(grid, 2)  # each program's share of the lambdas' gradient
    grads = [g if g.stride(-1) == 1 else g.contiguous() for g in (grad_q, grad_k, grad_v)]
    strides = [s for g in grads for s in (g.stride(0), g.stride(1), g.stride(2))]
    _qkv_prep_grad_kernel[(grid,)](*grads, *strides, qkv, ve, lambdas, cos, sin, grad_qkv, grad_ve if has_ve else qkv,
                                   partial, B * T, T, has_ve, H3 // 3, head_dim, rows, num_warps=warps,
                                   num_stages=stages)
    return grad_qkv, grad_ve, partial.sum(0).bfloat16().float()


@triton.jit
def _qk_rows(qkv, rows, head, HD: tl.constexpr, H3: tl.constexpr):
    """The two halves of head `head` of qkv's rows, float32, and their rsqrt(mean square + eps)."""
    half = tl.arange(0, HD // 2)[None, :]
    at = qkv + rows.to(tl.int64)[:, None] * (H3 * HD) + head * HD + half
    x1, x2 = tl.load(at).to(tl.float32), tl.load(at + HD // 2).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HD + 1.1920928955078125e-07)
    return x1, x2, rstd[:, None]


@triton.jit
def _qkv_prep_kernel(qkv, ve, lambdas, cos, sin, q, k, v, n, T, HAS_VE: tl.constexpr, H: tl.constexpr,
                     HD: tl.constexpr, ROWS: tl.constexpr):
    # ROWS tokens, all heads: q and k normed and rotated, v = lambdas[0] v + lambdas[1] ve
    rows = tl.minimum(tl.program_id(0) * ROWS + tl.arange(0, ROWS), n - 1)  # the last rows are done twice
    half = tl.arange(0, HD // 2)[None, :]
    table = (rows % T)[:, None] * (HD // 2) + half
    c, s = tl.load(cos + table), tl.load(sin + table)
    out_rows = rows.to(tl.int64)[:, None] * (H * HD)
    for head in tl.static_range(2 * H):  # the heads of q, then those of k
        x1, x2, rstd = _qk_rows(qkv, rows, head, HD, 3 * H)
        x1, x2 = x1 * rstd, x2 * rstd
        out = (q if head < H else k) + out_rows + (head % H) * HD + half
        tl.store(out, (x1 * c + x2 * s).to(tl.bfloat16))
        tl.store(out + HD // 2, (x2 * c - x1 * s).to(tl.bfloat16))
    cols = tl.arange(0, HD)[None, :]
    l0, l1 = tl.load(lambdas), tl.load(lambdas + 1)
    for head in tl.static_range(H):
        y = l0 * tl.load(qkv + rows.to(tl.int64)[:, None] * (3 * H * HD) + (2 * H + head) * HD + cols).to(
            tl.float32)
        if HAS_VE:
            y += l1 * tl.load(ve + out_rows + head * HD + cols).to(tl.float32)
        tl.store(v + out_rows + head * HD + cols, y.to(tl.bfloat16))


# The qkv projection with attention_inputs' forward in its epilogue, on Hopper: the MLP's ping-pong matmul (its
# loading warp and ring), each warpgroup's 128 x 128 tile of qkv being one head of q, k or v. The epilogue reads the
# tile's two halves of 64 columns, the rotation's halves, back from shared memory in one layout and pairs them
# element by element: q and k normed and rotated, v mixed with ve; qkv itself is neither stored nor read back.
QKV_MATMUL = Tile((128, 128, 64), warps=4, stages=4)


@torch.library.custom_op("speedrun::qkv_matmul_prep", mutates_args=())
def qkv_matmul_prep(x: Tensor, r: Tensor, w: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor,
                    sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """qkv_prep of qkv = r (x @ w.T) rounded to bf16, for x (B, T, dim) and w (3 dim, dim) bf16 and r (B, T, 1)
    float32, and qkv's v before the mix (B, T, H, head_dim), which the lambdas' gradient takes. This body is the
    reference; on CUDA the Gluon kernel runs instead."""
    B, T, _ = x.shape
    H3, head_dim = w.size(0) // cos.size(1) // 2, 2 * cos.size(1)
    qkv = (r * F.linear(x.float(), w.float())).bfloat16().view(B, T, H3, head_dim)
    return *qkv_prep(qkv, ve, lambdas, cos, sin), qk_rstd(qkv), qkv[:, :, 2 * H3 // 3:].contiguous()


def qk_rstd(qkv: Tensor) -> Tensor:
    """The QK norms' rsqrt(mean square + eps) of qkv (B, T, 3 H, head_dim) -> (B, T, 2 H) float32, q's heads then
    k's: what attention_inputs' backward from its outputs takes."""
    qk = qkv[:, :, :qkv.size(2) // 3 * 2].float()
    return rms_scale(qk.square().mean(-1))


@qkv_matmul_prep.register_fake
def _(x: Tensor, r: Tensor, w: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor, sin: Tensor):
    B, T, _ = x.shape
    H, head_dim = w.size(0) // 3 // (2 * cos.size(1)), 2 * cos.size(1)
    q, k, v, raw_v = (x.new_empty(B, T, H, head_dim) for _ in range(4))
    return q, k, v, x.new_empty(B, T, 2 * H, dtype=torch.float32), raw_v


@qkv_matmul_prep.register_kernel("cuda")
def _qkv_matmul_prep_gluon(x: Tensor, r: Tensor, w: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor,
                           sin: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, T, dim = x.shape
    head_dim = 2 * cos.size(1)
    H = w.size(0) // 3 // head_dim
    (BM, BN, BK), warps, stages = QKV_MATMUL
    if BN != head_dim:
        raise ValueError(f"QKV_MATMUL's {BN} columns a tile must be the head dimension, {head_dim}")
    x2 = x.reshape(B * T, dim).contiguous()
    q, k, v, raw_v = (x.new_empty(B * T, H * head_dim) for _ in range(4))
    rstd = x.new_empty(B * T, 2 * H, dtype=torch.float32)
    has_ve = ve is not None
    ve = ve.reshape(B * T, H * head_dim).contiguous() if has_ve else q  # a placeholder when there is none
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(num_sms, triton.cdiv(B * T, BM) * 3 * H),)
    _qkv_matmul_prep_kernel[grid](_gluon_tiles(x2, [BM, BK]), _gluon_tiles(w.contiguous(), [BN, BK]),
                                  *(_gluon_tiles(t, [BM, BN]) for t in (q, k, v, raw_v)), r.contiguous(), ve,
                                  lambdas, cos, sin, rstd, B * T, dim, T, has_ve, H, BM, BN, BK, stages,
                                  num_warps=warps, maxnreg=168)
    q, k, v, raw_v = (t.view(B, T, H, head_dim) for t in (q, k, v, raw_v))
    return q, k, v, rstd.view(B, T, 2 * H), raw_v


@gluon.jit
def _qkv_matmul_prep_kernel(x_desc, w_desc, q_desc, k_desc, v_desc, raw_v_desc, scale, ve, lambdas, cos, sin,
                            rstd, M, K, T, HAS_VE: gl.constexpr, H: gl.constexpr, BM: gl.constexpr,
                            BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr):
    # q, k, v (M, H * BN) bf16 as qkv_prep makes them from qkv = scale (x @ w.T) rounded to bf16 (scale: a float32
    # a row), rstd (M, 2 H), and raw_v (M, H * BN), qkv's v
    x_bufs, w_bufs, ready, empty, out_bufs, turn = _matmul_buffers(x_desc, w_desc, q_desc, STAGES)
    gl.warp_specialize([
        (_qkv_matmul_prep_consumer, (q_desc, k_desc, v_desc, raw_v_desc, scale, ve, lambdas, cos, sin, rstd, x_bufs,
                                     w_bufs, ready, empty, out_bufs, turn, M, K, T, HAS_VE, H, BM, BN, BK, STAGES,
                                     0)),
        (_qkv_matmul_prep_consumer, (q_desc, k_desc, v_desc, raw_v_desc, scale, ve, lambdas, cos, sin, rstd, x_bufs,
                                     w_bufs, ready, empty, out_bufs, turn, M, K, T, HAS_VE, H, BM, BN, BK, STAGES,
                                     1)),
        (_matmul_loads, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, 3 * H * BN, K, False, False, BM, BN, BK,
                         STAGES)),
    ], [4, 1], [240, 24])


@gluon.jit
def _qkv_matmul_prep_consumer(q_desc, k_desc, v_desc, raw_v_desc, scale, ve, lambdas, cos, sin, rstd, x_bufs,
                              w_bufs, ready, empty, out_bufs, turn, M, K, T, HAS_VE: gl.constexpr, H: gl.constexpr,
                              BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                              WHICH: gl.constexpr):
    # warpgroup WHICH, as _matmul_relu2_consumer: every other tile, its matmul, then its epilogue, _qkv_prep_kernel's
    # arithmetic. qkv's tile goes to shared memory, whence its two halves come back in one layout, so that the
    # rotation pairs column c with c + BN / 2 element by element
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    halves: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                            order=[1, 0])
    HALF: gl.constexpr = BN // 2
    k_steps = (K + BK - 1) // BK
    count = WHICH * k_steps
    out_tile, phase = out_bufs.index(WHICH), 0
    tile_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, halves))
    acc_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    half_cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, halves))
    for tile in range(gl.program_id(0) + WHICH * gl.num_programs(0), (M + BM - 1) // BM * 3 * H,
                      2 * gl.num_programs(0)):
        off_m, head = _tile_at(tile, M, 3 * H * BN, BM, BN, False)
        head = head // BN  # of q's H, then k's, then v's
        col = (head % H) * BN
        x_scale = gl.load(scale + off_m + acc_rows, mask=off_m + acc_rows < M, other=0.0)[:, None]
        acc, count = _matmul_tile(x_bufs, w_bufs, ready, empty, turn, count, phase, k_steps, layout, False, BM, BN,
                                  STAGES, WHICH)
        tma.store_wait(0)  # the last tile's stores have left out_tile
        out_tile.store(_bf16(acc * x_scale))  # qkv's tile, rounded as stored
        gl.thread_barrier()  # all of it, before each thread reads its halves back
        first, second = out_tile.slice(0, HALF, dim=1), out_tile.slice(HALF, HALF, dim=1)
        y1, y2 = _f32_of_bf16(first.load(halves)), _f32_of_bf16(second.load(halves))
        rows = gl.minimum(off_m + tile_rows, M - 1)  # rows past M (x's are zeros) read row M - 1's tables
        if head < 2 * H:  # q or k: normed, then rotated
            r = gl.rsqrt((gl.sum(y1 * y1, axis=1) + gl.sum(y2 * y2, axis=1)) / BN + 1.1920928955078125e-07)
            gl.store(rstd + rows.to(gl.int64) * (2 * H) + head, r, mask=off_m + tile_rows < M)
            y1, y2 = y1 * r[:, None], y2 * r[:, None]
            table = (rows % T)[:, None] * HALF + half_cols[None, :]
            c, s = gl.load(cos + table), gl.load(sin + table)
            y1, y2 = y1 * c + y2 * s, y2 * c - y1 * s
        else:  # v: stored as it is, then lambdas[0] v + lambdas[1] ve
            fence_async_shared()
            _tma_store(raw_v_desc, [off_m, col], out_tile)
            l0 = gl.load(lambdas)
            if HAS_VE:
                l1 = gl.load(lambdas + 1)
                at = rows.to(gl.int64)[:, None] * (H * BN) + col + half_cols[None, :]
                y1 = l0 * y1 + l1 * _f32_of_bf16(gl.load(ve + at))
                y2 = l0 * y2 + l1 * _f32_of_bf16(gl.load(ve + at + HALF))
            else:
                y1, y2 = l0 * y1, l0 * y2
            tma.store_wait(0)  # qkv's v has left out_tile
        first.store(y1.to(gl.bfloat16))  # each thread writes back where it read
        second.store(y2.to(gl.bfloat16))
        fence_async_shared()
        if head < H:
            _tma_store(q_desc, [off_m, col], out_tile)
        elif head < 2 * H:
            _tma_store(k_desc, [off_m, col], out_tile)
        else:
            _tma_store(v_desc, [off_m, col], out_tile)
        phase ^= 1
    tma.store_wait(0)


@triton.jit
def _qkv_prep_grad_kernel(grad_q, grad_k, grad_v, gq_b, gq_t, gq_h, gk_b, gk_t, gk_h, gv_b, gv_t, gv_h, qkv, ve,
                          lambdas, cos, sin, grad_qkv, grad_ve, partial, n, T, HAS_VE: tl.constexpr,
                          H: tl.constexpr, HD: tl.constexpr, ROWS: tl.constexpr):
    # ROWS tokens, all heads: the gradients of q, k, v (strided (B, T, H, HD)) -> those of qkv and ve, and
    # this program's sums for the lambdas' gradient
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    valid = rows < n
    rows = tl.minimum(rows, n - 1)  # the last rows are done twice, their sums counted once
    b, t = rows // T, rows % T
    half = tl.arange(0, HD // 2)[None, :]
    table = t[:, None] * (HD // 2) + half
    c, s = tl.load(cos + table), tl.load(sin + table)
    qkv_rows = rows.to(tl.int64)[:, None] * (3 * H * HD)
    for head in tl.static_range(2 * H):
        if head < H:
            at = grad_q + b.to(tl.int64)[:, None] * gq_b + t[:, None] * gq_t + head * gq_h + half
        else:
            at = grad_k + b.to(tl.int64)[:, None] * gk_b + t[:, None] * gk_t + (head - H) * gk_h + half
        g1, g2 = tl.load(at).to(tl.float32), tl.load(at + HD // 2).to(tl.float32)
        _qk_rows_grad(g1, g2, c, s, qkv, grad_qkv, rows, head, HD, 3 * H)
    cols = tl.arange(0, HD)[None, :]
    l0, l1 = tl.load(lambdas), tl.load(lambdas + 1)
    dot_v = tl.zeros((ROWS, HD), dtype=tl.float32)
    dot_ve = tl.zeros((ROWS, HD), dtype=tl.float32)
    for head in tl.static_range(H):
        g = tl.load(grad_v + b.to(tl.int64)[:, None] * gv_b + t[:, None] * gv_t + head * gv_h + cols).to(
            tl.float32)
        at = qkv_rows + (2 * H + head) * HD + cols
        dot_v += tl.where(valid[:, None], g * tl.load(qkv + at).to(tl.float32), 0.0)
        tl.store(grad_qkv + at, (l0 * g).to(tl.bfloat16))
        if HAS_VE:
            at_ve = rows.to(tl.int64)[:, None] * (H * HD) + head * HD + cols
            dot_ve += tl.where(valid[:, None], g * tl.load(ve + at_ve).to(tl.float32), 0.0)
            tl.store(grad_ve + at_ve, (l1 * g).to(tl.bfloat16))
    tl.store(partial + 2 * tl.program_id(0), tl.sum(tl.sum(dot_v, axis=1), axis=0))
    tl.store(partial + 2 * tl.program_id(0) + 1, tl.sum(tl.sum(dot_ve, axis=1), axis=0))


@triton.jit
def _qk_rows_grad(g1, g2, c, s, qkv, grad_qkv, rows, head, HD: tl.constexpr, H3: tl.constexpr):
    """The gradient of head `head` of qkv's rows, stored bf16 in grad_qkv (laid out as qkv), from that of the
    rows normed and rotated, in halves g1, g2 float32, and the rows' cos and sin c, s: the inverse rotation, then
    the norm's backward, with rstd recomputed from qkv."""
    d1, d2 = g1 * c - g2 * s, g1 * s + g2 * c  # the gradient of the normed halves: the inverse rotation
    x1, x2, rstd = _qk_rows(qkv, rows, head, HD, H3)
    _qk_norm_grad(d1, d2, x1 * rstd, x2 * rstd, rstd, grad_qkv, rows, head, HD, H3)


@triton.jit
def _qk_norm_grad(d1, d2, x1, x2, rstd, grad_qkv, rows, head, HD: tl.constexpr, H3: tl.constexpr):
    """The norm's backward: the gradient of head `head` of qkv's rows, stored bf16 in grad_qkv, from those of the
    normed halves d1, d2, the normed halves x1, x2 and rstd (rows, 1), all float32."""
    mean_dot = ((tl.sum(d1 * x1, axis=1) + tl.sum(d2 * x2, axis=1)) / HD)[:, None]
    out = grad_qkv + rows.to(tl.int64)[:, None] * (H3 * HD) + head * HD + tl.arange(0, HD // 2)[None, :]
    tl.store(out, (rstd * (d1 - x1 * mean_dot)).to(tl.bfloat16))
    tl.store(out + HD // 2, (rstd * (d2 - x2 * mean_dot)).to(tl.bfloat16))


# --- attention_block: the qkv matmul, attention_inputs, then attention, as the model calls them. With both fused on
# Hopper, the forward is two ops: the qkv matmul with attention_inputs in its epilogue (qkv_matmul_prep: qkv, 300 MB a
# layer at 64K tokens, is neither stored nor read back), then the attention. The backward is one op and the matmul's
# two: the attention's backward kernels go on with attention_inputs' backward of their tiles, from q, k, rstd and
# qkv's v, so the gradients of q, k and v (bf16, 100 MB each) are neither stored nor read back either. As the fused
# MLP, the block takes norm(x) as x and its row scales: the matmul scales its sums, the backward kernels their
# gradient of qkv.


def attention_block_fused(x: Tensor, r: Tensor, w: Tensor, ve: Tensor | None, lambdas: Tensor, rotary: Rotary,
                          mask: DocumentWindows) -> Tensor:
    """attention_block_reference by qkv_matmul_prep's and window_attention's forward ops, and one op for their
    backward (the matmul's own backward aside). The qkv matmul scales its rows by r in its epilogue."""
    T = x.size(1)
    return WindowAttentionBlock.apply(x, r, w, ve, lambdas, rotary.cos[:T], rotary.sin[:T], *mask)


def attention_block_reference(x: Tensor, r: Tensor, w: Tensor, ve: Tensor | None, lambdas: Tensor, rotary: Rotary,
                              mask: "BlockMask | DocumentWindows") -> Tensor:
    """x (B, T, dim), its row scale r (B, T, 1) and the merged qkv weight w (3 dim, dim) bf16 -> the attention's
    output (B, T, H, head_dim): the qkv projection of scaled(x, r), attention_inputs, then attention, as bound."""
    B, T, _ = x.shape
    qkv = F.linear(scaled(x, r), w).view(B, T, -1, 2 * rotary.cos.size(1))
    return attention(*attention_inputs(qkv, ve, lambdas, rotary), mask)


class WindowAttentionBlock(torch.autograd.Function):
    """attention_block_fused: qkv_matmul_prep and window_attention forward; backward, window_attention_inputs_grad
    and the qkv matmul's two gradients (with r's, as FusedReLU2MLP's). qkv itself is never stored: what the
    backward takes is the forward's outputs, rstd and qkv's v."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, w: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor, sin: Tensor,
                starts: Tensor, ends: Tensor, window_blocks: Tensor):
        q, k, v, rstd, raw_v = qkv_matmul_prep(x, r, w, ve, lambdas, cos, sin)
        out, lse = window_attention(q, k, v, starts, window_blocks)
        ctx.save_for_backward(x, r, w, raw_v, ve, lambdas, cos, sin, q, k, v, rstd, out, lse, starts, ends,
                              window_blocks)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, r, w, *saved = ctx.saved_tensors
        has_ve = saved[1] is not None  # saved: raw_v, ve, ...
        grad_qkv, grad_ve, grad_lambdas = window_attention_inputs_grad(grad_out, *saved, r)  # r grad_qkv
        grad_qkv = grad_qkv.flatten(end_dim=1).flatten(1)  # (B T, 3 dim), as qkv's matmul made it
        grad_x, grad_w = (grad_qkv @ w).view_as(x), grad_qkv.T @ x.flatten(end_dim=1)
        return grad_x, row_scale_grad(grad_x, x, r), grad_w, grad_ve if has_ve else None, grad_lambdas, *[None] * 5


@torch.library.custom_op("speedrun::window_attention_inputs_grad", mutates_args=())
def window_attention_inputs_grad(grad_out: Tensor, raw_v: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor,
                                 sin: Tensor, q: Tensor, k: Tensor, v: Tensor, rstd: Tensor, out: Tensor,
                                 lse: Tensor, starts: Tensor, ends: Tensor, window_blocks: Tensor,
                                 x_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """window_attention_grad, then attention_inputs' backward from qkv_prep's outputs (qkv_prep_grad_of_outputs):
    the gradient of the attention's output -> those of qkv times x_scale (B, T, 1), a float32 a row, of ve (empty
    without ve) and of lambdas. raw_v is qkv's v. This body is the reference; on CUDA
    _window_attention_inputs_grad_triton runs instead, which rounds the gradient of qkv once, after the scale."""
    grad_q, grad_k, grad_v = window_attention_grad(grad_out, q, k, v, out, lse, starts, ends, window_blocks)
    grad_qkv, grad_ve, grad_lambdas = qkv_prep_grad_of_outputs(grad_q, grad_k, grad_v, q, k, rstd, raw_v, ve,
                                                               lambdas, cos, sin)
    return (grad_qkv.float() * x_scale[..., None]).bfloat16(), grad_ve, grad_lambdas


@window_attention_inputs_grad.register_fake
def _(grad_out: Tensor, raw_v: Tensor, ve: Tensor | None, lambdas: Tensor, cos: Tensor, sin: Tensor, q: Tensor,
      k: Tensor, v: Tensor, rstd: Tensor, out: Tensor, lse: Tensor, starts: Tensor, ends: Tensor,
      window_blocks: Tensor, x_scale: Tensor):
    B, T, H, head_dim = q.shape
    grad_ve = ve.new_empty(ve.shape) if ve is not None else q.new_empty(0)
    return q.new_empty(B, T, 3 * H, head_dim), grad_ve, lambdas.new_empty(2)


@window_attention_inputs_grad.register_kernel("cuda")
def _window_attention_inputs_grad_triton(grad_out: Tensor, raw_v: Tensor, ve: Tensor | None, lambdas: Tensor,
                                         cos: Tensor, sin: Tensor, q: Tensor, k: Tensor, v: Tensor, rstd: Tensor,
                                         out: Tensor, lse: Tensor, starts: Tensor, ends: Tensor,
                                         window_blocks: Tensor, x_scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    B, T, H, head_dim = q.shape
    has_ve = ve is not None
    grad_qkv, grad_ve = q.new_empty(B, T, 3 * H, head_dim), ve.new_empty(ve.shape) if has_ve else q.new_empty(0)
    partial = lambdas.new_empty(T // ATTENTION_GRAD_KV.block[1] * H, 2)  # each key program's share of grad_lambdas
    raw_v, ve = raw_v.contiguous(), ve.contiguous() if has_ve else raw_v  # ve: a placeholder when there is none
    _window_attention_grad_kernels(grad_out, q, k, v, out, lse, starts, ends, window_blocks,
                                   (grad_qkv, grad_qkv, grad_ve if has_ve else grad_qkv),
                                   (raw_v, rstd.contiguous(), x_scale.contiguous(), ve, lambdas, cos, sin, partial,
                                    has_ve))
    return grad_qkv, grad_ve, partial.sum(0).bfloat16().float()


# The attention's backward kernels with INPUTS end in these epilogues, for a tile of rows (tokens) of one head: its
# gradient of q, k or v, bf16 as window_attention_grad stores it, through attention_inputs' backward in float32,
# as _qkv_prep_grad_kernel computes it


@triton.jit
def _qk_grad_tile(grad, tile, rstd, x_scale, cos, sin, grad_qkv, rows, head, HD: tl.constexpr, H3: tl.constexpr):
    """grad (rows, HD), the gradient of q or k at head `head` of qkv's H3, and tile, the rows of q or k itself
    (normed and rotated, bf16) -> the gradient of qkv times the rows' x_scale, stored. The normed rows come back
    from the tile by the inverse rotation, and rstd from the forward, so q and k are read once a tile, not also
    qkv: rounded to bf16, they leave the gradient as close to float64's as the plain path's is
    (tests/test_attention.py)."""
    table = rows[:, None] * (HD // 2) + tl.arange(0, HD // 2)[None, :]
    c, s = tl.load(cos + table), tl.load(sin + table)
    g1, g2 = _halves(grad)
    y1, y2 = _halves(tile)
    d1, d2 = g1 * c - g2 * s, g1 * s + g2 * c  # the gradient of the normed halves: the inverse rotation
    x1, x2 = y1 * c - y2 * s, y1 * s + y2 * c  # the normed halves, likewise
    r = tl.load(rstd + rows.to(tl.int64)[:, None] * (H3 // 3 * 2) + head) * tl.load(x_scale + rows)[:, None]
    _qk_norm_grad(d1, d2, x1, x2, r, grad_qkv, rows, head, HD, H3)


@triton.jit
def _halves(tile):
    """(rows, HD) -> its rotation's halves, float32: (rows, 2, HD / 2) -> (rows, HD / 2, 2), split on the last."""
    return tl.split(tl.permute(tl.reshape(tile.to(tl.float32), (tile.shape[0], 2, tile.shape[1] // 2)), (0, 2, 1)))


@triton.jit
def _v_grad_tile(grad, raw_v, x_scale, ve, lambdas, grad_qkv, grad_ve, partial, rows, head, H: tl.constexpr,
                 HD: tl.constexpr, HAS_VE: tl.constexpr):
    """grad (rows, HD), the gradient of v at head `head` -> those of qkv (times the rows' x_scale) and ve, stored,
    and the tile's sums for the lambdas' gradient (with qkv's v, raw_v (rows, H HD)), stored in this program's row
    of partial."""
    g = grad.to(tl.float32)
    cols = tl.arange(0, HD)[None, :]
    tl.store(grad_qkv + rows.to(tl.int64)[:, None] * (3 * H * HD) + (2 * H + head) * HD + cols,
             (tl.load(lambdas) * g * tl.load(x_scale + rows)[:, None]).to(tl.bfloat16))
    program = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    at_ve = rows.to(tl.int64)[:, None] * (H * HD) + head * HD + cols  # raw_v and ve share the layout
    tl.store(partial + 2 * program, tl.sum(tl.sum(g * tl.load(raw_v + at_ve).to(tl.float32), axis=1), axis=0))
    if HAS_VE:
        tl.store(grad_ve + at_ve, (tl.load(lambdas + 1) * g).to(tl.bfloat16))
        tl.store(partial + 2 * program + 1, tl.sum(tl.sum(g * tl.load(ve + at_ve).to(tl.float32), axis=1), axis=0))
    else:
        tl.store(partial + 2 * program + 1, 0.0)


# --- relu2_mlp: the MLP's two matmuls that have elementwise work beside them, each one Gluon matmul on Hopper
# The up-projection of norm(x) = r x (r: the row scales) stores h = relu(a)^2 for a = r (x @ w_fc.T) in one pass,
# and the backward stores r grad_a = r (grad_y @ w_proj) * 2 relu(a) in one pass; torch.compile makes each a cuBLAS
# matmul and an inductor kernel that reads the matmul's output again, and writes norm(x) for the matmul to read.
# Rounding: the backward's matmul to bf16, then the epilogue once, from float32, as compiled; the forward rounds once
# where the plain path rounds norm(x) to bf16 first, so it is as close to float64 as the plain path or closer.
# a itself is neither stored nor kept for the backward: relu(a) is sqrt(h) rounded to bf16, exactly (see
# relu_of_square).


# Each warpgroup's tile of the output, (rows, columns, depth), fixed rather than autotuned; its stages are the ring of
# (x, w) tiles that the loading warp keeps full. Measured in the speed record's leads table.
MLP_MATMUL = Tile((128, 128, 64), warps=4, stages=4)


def relu2_mlp_fused(x: Tensor, r: Tensor, w_fc: Tensor, w_proj: Tensor) -> Tensor:
    """relu2_mlp_reference with its up-projection and that one's backward as the Gluon matmul below, which scales
    the rows by r in its epilogue: norm(x) is never stored."""
    return FusedReLU2MLP.apply(x.flatten(end_dim=-2), r.flatten(end_dim=-2), w_fc, w_proj).view_as(x)


def relu2_mlp_reference(x: Tensor, r: Tensor, w_fc: Tensor, w_proj: Tensor) -> Tensor:
    """relu(n @ w_fc.T)^2 @ w_proj.T for n = scaled(x, r), x (..., dim), r (..., 1) and bf16 weights (ReLU^2
    suggested by @SKYLINEZ007 and @Grad62304977, after arXiv:2109.08668)."""
    return F.linear(F.relu(F.linear(scaled(x, r), w_fc)).square(), w_proj)


class FusedReLU2MLP(torch.autograd.Function):
    """relu2_mlp_fused for x (n, dim) and r (n, 1) with the two custom ops below: a = r (x @ w_fc.T), r applied to
    the matmul's float32 sums. Saves x, r and h: not a, nor norm(x)."""

    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, w_fc: Tensor, w_proj: Tensor) -> Tensor:
        h = matmul_relu2(x, w_fc, r)
        ctx.save_for_backward(x, r, w_fc, w_proj, h)
        return h @ w_proj.T

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, r, w_fc, w_proj, h = ctx.saved_tensors
        grad_a_r = matmul_relu2_grad(grad_y, w_proj, h, r)
        grad_x = grad_a_r @ w_fc
        return grad_x, row_scale_grad(grad_x, x, r), grad_a_r.T @ x, grad_y.T @ h


def row_scale_grad(grad_x: Tensor, x: Tensor, r: Tensor) -> Tensor:
    """For out = r (x @ w.T), r a row scale, whose backward makes r grad_out (the rows scaled as in the forward):
    grad_x = (r grad_out) @ w is x's gradient, and w's is (r grad_out).T @ x. This is r's: a row's
    sum(grad_out * (x @ w.T)) = sum(grad_x * x) / r."""
    return (grad_x.float() * x.float()).sum(-1, keepdim=True) / r


def relu_of_square(h: Tensor) -> Tensor:
    """relu(a) from h = relu(a)^2 rounded to bf16, for a in bf16: sqrt(h) rounded to bf16 is relu(a) itself. The
    square's rounding, half a step of h at most, moves sqrt(h) by less than half a step of relu(a), so the rounding
    lands back on relu(a). That holds for relu(a) in [2^-63, 2^64), which tests/test_fused_mlp.py checks for every
    bf16: below, the square is subnormal or 0 (gradients under 1e-19 of grad_y's come out 0 or up to 40% off);
    above, h is already inf in the forward."""
    return h.float().sqrt().bfloat16()


@torch.library.custom_op("speedrun::matmul_relu2", mutates_args=())
def matmul_relu2(x: Tensor, w: Tensor, r: Tensor) -> Tensor:
    """x (n, k) and w (m, k) bf16, r (n, 1) float32 -> relu(a)^2 for a = r (x @ w.T) rounded to bf16, (n, m) bf16.
    This body is the reference; on CUDA the Gluon kernel runs instead."""
    return F.relu((r * (x.float() @ w.float().T)).bfloat16()).square()


@matmul_relu2.register_fake
def _(x: Tensor, w: Tensor, r: Tensor):
    return x.new_empty(x.size(0), w.size(0))


@torch.library.custom_op("speedrun::matmul_relu2_grad", mutates_args=())
def matmul_relu2_grad(grad_y: Tensor, w: Tensor, h: Tensor, r: Tensor) -> Tensor:
    """grad_y (n, k), w (k, m), h = relu(a)^2 (n, m) bf16, r (n, 1) float32 -> r (grad_y @ w) 2 relu(a), r times
    the gradient of a, (n, m) bf16 (the matmul rounded to bf16, the rest once). This body is the reference; on CUDA
    the Gluon kernel runs instead."""
    return ((grad_y @ w).float() * 2 * relu_of_square(h).float() * r).bfloat16()


@matmul_relu2_grad.register_fake
def _(grad_y: Tensor, w: Tensor, h: Tensor, r: Tensor):
    return torch.empty_like(h)


@matmul_relu2.register_kernel("cuda")
def _matmul_relu2_cuda(x: Tensor, w: Tensor, r: Tensor) -> Tensor:
    return _matmul_relu2_gluon(x.contiguous(), w.contiguous(), None, r.contiguous(), w_kn=False)


@matmul_relu2_grad.register_kernel("cuda")
def _matmul_relu2_grad_cuda(grad_y: Tensor, w: Tensor, h: Tensor, r: Tensor) -> Tensor:
    return _matmul_relu2_gluon(grad_y.contiguous(), w.contiguous(), h.contiguous(), r.contiguous(), w_kn=True)


def _matmul_relu2_gluon(x: Tensor, w: Tensor, h: Tensor | None, r: Tensor, w_kn: bool) -> Tensor:
    """The forward without h, the backward with it."""
    M, K = x.shape
    N = w.size(1) if w_kn else w.size(0)
    (BM, BN, BK), warps, stages = MLP_MATMUL
    out = x.new_empty(M, N)
    h = out if h is None else h
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(num_sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    _matmul_relu2_kernel[grid](_gluon_tiles(x, [BM, BK]), _gluon_tiles(w, [BK, BN] if w_kn else [BN, BK]),
                               _gluon_tiles(h, [BM, BN]), _gluon_tiles(out, [BM, BN]), r, M, N, K, w_kn,
                               h is not out, BM, BN, BK, stages, num_warps=warps, maxnreg=168)
    return out


def _gluon_tiles(t: Tensor, block: list[int]) -> "GluonTensorDescriptor":
    """A descriptor of the 2-D bf16 or float8_e4m3fn tensor t for the TMA, in tiles of block, swizzled for the
    tensor cores."""
    dtype = gl.float8e4nv if t.dtype == torch.float8_e4m3fn else gl.bfloat16
    return GluonTensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


# The matmul is warp-specialised and persistent, as CUTLASS's "ping-pong" kernels for Hopper are: a program an SM,
# whose tiles alternate between two warpgroups, each with its own accumulator, fed by one warp that loads (x, w)
# tiles through the TMA into a ring of stages; while one warpgroup runs its epilogue, the other's matmul keeps the
# tensor cores busy. maxnreg=168 caps the 3 warpgroups' registers at the register file; the two consumers take 240
# each and the loading warp's group 24.


@gluon.jit
def _matmul_relu2_kernel(x_desc, w_desc, h_desc, out_desc, scale, M, N, K, W_KN: gl.constexpr,
                         BACKWARD: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                         STAGES: gl.constexpr):
    # y = x @ w (w stored (K, N): W_KN) or x @ w.T (w stored (N, K)); scale: a float32 a row. Forward: stores
    # relu(a)^2 for a = scale y rounded to bf16 as out. Backward: stores scale y 2 relu(a) as out, y rounded to bf16
    # first, relu(a) from h as relu_of_square has it (gl.sqrt, the fast approximate one: its error is far inside that
    # function's margin).
    x_bufs, w_bufs, ready, empty, out_bufs, turn = _matmul_buffers(x_desc, w_desc, out_desc, STAGES)
    h_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(h_ready.index(i), count=1)
    gl.warp_specialize([
        (_matmul_relu2_consumer, (h_desc, out_desc, scale, x_bufs, w_bufs, ready, empty, out_bufs, h_ready, turn, M,
                                  N, K, W_KN, BACKWARD, BM, BN, BK, STAGES, 0)),
        (_matmul_relu2_consumer, (h_desc, out_desc, scale, x_bufs, w_bufs, ready, empty, out_bufs, h_ready, turn, M,
                                  N, K, W_KN, BACKWARD, BM, BN, BK, STAGES, 1)),
        (_matmul_loads, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, N, K, W_KN, False, BM, BN, BK, STAGES)),
    ], [4, 1], [240, 24])


@gluon.jit
def _matmul_buffers(x_desc, w_desc, out_desc, STAGES: gl.constexpr):
    """The ping-pong kernels' shared memory: the ring of STAGES (x, w) tiles with its ready and empty barriers,
    each consumer's output tile, and the turn barriers by which the two consumers alternate."""
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    out_bufs = gl.allocate_shared_memory(out_desc.dtype, [2] + out_desc.block_type.shape, out_desc.layout)
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    return x_bufs, w_bufs, ready, empty, out_bufs, turn


@gluon.jit
def _tile_at(tile, M, N, BM: gl.constexpr, BN: gl.constexpr, N_MAJOR: gl.constexpr):
    """The row and column where the program's tile `tile` starts: tiles go along the rows of out (x's row blocks,
    each against all of w's), or with N_MAJOR down its columns (w's row blocks, each against all of x's)."""
    if N_MAJOR:
        num_m = (M + BM - 1) // BM
        off_m, off_n = tile % num_m * BM, tile // num_m * BN
    else:
        num_n = (N + BN - 1) // BN
        off_m, off_n = tile // num_n * BM, tile % num_n * BN
    return off_m, off_n


@gluon.jit
def _matmul_loads(x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, N, K, W_KN: gl.constexpr, N_MAJOR: gl.constexpr,
                  BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr):
    # the loading warp: the program's tiles in order, each one's (x, w) tiles along K into the next free stage
    count = 0
    for tile in range(gl.program_id(0), (M + BM - 1) // BM * ((N + BN - 1) // BN), gl.num_programs(0)):
        off_m, off_n = _tile_at(tile, M, N, BM, BN, N_MAJOR)
        for k in range(0, K, BK):
            stage = count % STAGES
            mbarrier.wait(empty.index(stage), (count // STAGES & 1) ^ 1)  # a new barrier passes parity 1 at once
            mbarrier.expect(ready.index(stage), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            _tma_load(x_desc, [off_m, k], ready.index(stage), x_bufs.index(stage))
            if W_KN:
                _tma_load(w_desc, [k, off_n], ready.index(stage), w_bufs.index(stage))
            else:
                _tma_load(w_desc, [off_n, k], ready.index(stage), w_bufs.index(stage))
            count += 1


@gluon.jit
def _matmul_tile(x_bufs, w_bufs, ready, empty, turn, count, phase, k_steps, layout: gl.constexpr,
                 W_KN: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, STAGES: gl.constexpr, WHICH: gl.constexpr):
    """A consumer warpgroup's matmul of one tile by wgmma from the ring (one in flight while the next stage is
    awaited) -> the float32 accumulator and the ring's count past the other warpgroup's next tile. The two take
    turns at their matmuls (turn): a wait on a stage's barrier tells only the parity of its fills, so a warpgroup
    may wait for a stage's next fill only once the other has waited for the fill before it."""
    acc = gl.zeros((BM, BN), dtype=gl.float32, layout=layout)
    mbarrier.wait(turn.index(WHICH), phase ^ (1 - WHICH))  # warpgroup 0's first wait passes at once
    for k in range(k_steps):
        stage = count % STAGES
        mbarrier.wait(ready.index(stage), count // STAGES & 1)
        if W_KN:
            acc = warpgroup_mma(x_bufs.index(stage), w_bufs.index(stage), acc, is_async=True)
        else:
            acc = warpgroup_mma(x_bufs.index(stage), w_bufs.index(stage).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
        mbarrier.arrive(empty.index((count + STAGES - 1) % STAGES), count=1, pred=k > 0)  # the one before
        count += 1
    mbarrier.arrive(turn.index(1 - WHICH), count=1)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((count + STAGES - 1) % STAGES), count=1)
    return acc, count + k_steps


@gluon.jit
def _matmul_relu2_consumer(h_desc, out_desc, scale, x_bufs, w_bufs, ready, empty, out_bufs, h_ready, turn, M, N,
                           K, W_KN: gl.constexpr, BACKWARD: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                           BK: gl.constexpr, STAGES: gl.constexpr, WHICH: gl.constexpr):
    # warpgroup WHICH: every other tile of the program's, its matmul, then its epilogue through its own tile of
    # shared memory and the TMA. In the backward, h's tile arrives there during the matmul; the rows' scales are
    # loaded before it.
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    tile_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    k_steps = (K + BK - 1) // BK
    count = WHICH * k_steps  # the ring's count at this warpgroup's first tile: the loading warp goes in tile order
    out_tile, h_bar, phase = out_bufs.index(WHICH), h_ready.index(WHICH), 0
    for tile in range(gl.program_id(0) + WHICH * gl.num_programs(0), (M + BM - 1) // BM * ((N + BN - 1) // BN),
                      2 * gl.num_programs(0)):
        off_m, off_n = _tile_at(tile, M, N, BM, BN, False)
        tma.store_wait(0)  # the last tile's output has left out_tile
        if BACKWARD:
            mbarrier.expect(h_bar, h_desc.block_type.nbytes)
            _tma_load(h_desc, [off_m, off_n], h_bar, out_tile)
        rows = off_m + tile_rows
        r = gl.load(scale + rows, mask=rows < M, other=0.0)[:, None]
        acc, count = _matmul_tile(x_bufs, w_bufs, ready, empty, turn, count, phase, k_steps, layout, W_KN, BM, BN,
                                  STAGES, WHICH)
        if BACKWARD:
            y = _f32_of_bf16(_bf16(acc))
            mbarrier.wait(h_bar, phase)
            relu_a = _f32_of_bf16(_bf16(gl.sqrt(_f32_of_bf16(out_tile.load(layout)))))
            out_tile.store((y * relu_a * (2 * r)).to(gl.bfloat16))
        else:
            out_tile.store(_relu_square_bf16(_bf16(acc * r)))
        fence_async_shared()
        _tma_store(out_desc, [off_m, off_n], out_tile)
        phase ^= 1
    tma.store_wait(0)


# --- residual_projection: the attention's output projection, the residual add after it and the next row scale's
# squares, one Gluon matmul on Hopper. Compiled, the plain path is a cuBLAS matmul whose output an inductor kernel
# reads again with x, to add them and sum the squares: the matmul here reads x's tile in its epilogue instead, and
# stores the sum and each tile's row sums of squares, whose rows' totals give the row scale. Rounding as compiled:
# the product to bf16, then the sum; the row scale's sums in another order.

# The MLP's ping-pong tile
RESIDUAL_MATMUL = MLP_MATMUL


def residual_projection_fused(x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """residual_projection_reference by the Gluon matmul below (matmul_residual)."""
    out, r = ResidualProjection.apply(x.flatten(end_dim=-2), y.flatten(end_dim=-2), w)
    return out.view_as(x), r.view(*x.shape[:-1], 1)


def residual_projection_reference(x: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """x + y @ w.T for x, y (..., dim) and w (dim, dim) bf16, and the sum's row scale (..., 1) float32."""
    out = x + F.linear(y, w)
    return out, row_scale(out)


class ResidualProjection(torch.autograd.Function):
    """residual_projection_fused for x, y (n, dim): out = x + y @ w.T and r, out's row scale, from the matmul's
    row sums of squares. Saves y, w, out and r."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, w: Tensor):
        out, squares = matmul_residual(y, w, x)
        r = rms_scale(squares.sum(0) / out.size(1))[:, None]
        ctx.save_for_backward(y, w, out, r)
        return out, r

    @staticmethod
    def backward(ctx, grad_out: Tensor, grad_r: Tensor):
        y, w, out, r = ctx.saved_tensors
        # r = (mean(out^2) + eps)^(-1/2): r's gradient reaches out as grad_r (-r^3 / dim) out
        grad = (grad_out.float() - grad_r * r**3 / out.size(1) * out.float()).bfloat16()
        return grad, grad @ w, grad.T @ y


@torch.library.custom_op("speedrun::matmul_residual", mutates_args=())
def matmul_residual(y: Tensor, w: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """y (n, k), w (m, k) and x (n, m) bf16 -> out = x + y @ w.T (the product rounded to bf16, then the sum), (n, m)
    bf16, and its squares' sums over each tile of RESIDUAL_MATMUL's columns, (tiles, n) float32. This body is the
    reference; on CUDA the Gluon kernel runs instead."""
    out = (x.float() + (y @ w.T).float()).bfloat16()
    block_n = RESIDUAL_MATMUL.block[1]
    padded = F.pad(out.float(), (0, -out.size(1) % block_n))
    return out, padded.square().view(out.size(0), -1, block_n).sum(-1).T.contiguous()


@matmul_residual.register_fake
def _(y: Tensor, w: Tensor, x: Tensor):
    tiles = -(-x.size(1) // RESIDUAL_MATMUL.block[1])
    return torch.empty_like(x), x.new_empty(tiles, x.size(0), dtype=torch.float32)


@matmul_residual.register_kernel("cuda")
def _matmul_residual_gluon(y: Tensor, w: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    y, w, x = y.contiguous(), w.contiguous(), x.contiguous()
    (M, K), N = y.shape, w.size(0)
    (BM, BN, BK), warps, stages = RESIDUAL_MATMUL
    out = torch.empty_like(x)
    squares = x.new_empty(triton.cdiv(N, BN), M, dtype=torch.float32)
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = (min(num_sms, triton.cdiv(M, BM) * triton.cdiv(N, BN)),)
    _matmul_residual_kernel[grid](_gluon_tiles(y, [BM, BK]), _gluon_tiles(w, [BN, BK]), _gluon_tiles(x, [BM, BN]),
                                  _gluon_tiles(out, [BM, BN]), squares, M, N, K, BM, BN, BK, stages, num_warps=warps,
                                  maxnreg=168)
    return out, squares


@gluon.jit
def _matmul_residual_kernel(y_desc, w_desc, x_desc, out_desc, squares, M, N, K, BM: gl.constexpr, BN: gl.constexpr,
                            BK: gl.constexpr, STAGES: gl.constexpr):
    # out = x + y @ w.T (w stored (N, K)), and squares[j, row] the sum of out's squares over the row's j-th tile of
    # BN columns: the MLP's ping-pong matmul, x's tile loaded into the output tile's shared memory during it
    y_bufs, w_bufs, ready, empty, out_bufs, turn = _matmul_buffers(y_desc, w_desc, out_desc, STAGES)
    x_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(x_ready.index(i), count=1)
    gl.warp_specialize([
        (_matmul_residual_consumer, (x_desc, out_desc, squares, y_bufs, w_bufs, ready, empty, out_bufs, x_ready, turn,
                                     M, N, K, BM, BN, BK, STAGES, 0)),
        (_matmul_residual_consumer, (x_desc, out_desc, squares, y_bufs, w_bufs, ready, empty, out_bufs, x_ready, turn,
                                     M, N, K, BM, BN, BK, STAGES, 1)),
        (_matmul_loads, (y_desc, w_desc, y_bufs, w_bufs, ready, empty, M, N, K, False, False, BM, BN, BK, STAGES)),
    ], [4, 1], [240, 24])


@gluon.jit
def _matmul_residual_consumer(x_desc, out_desc, squares, y_bufs, w_bufs, ready, empty, out_bufs, x_ready, turn, M,
                              N, K, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
                              WHICH: gl.constexpr):
    # warpgroup WHICH, as _matmul_relu2_consumer's backward, with x's tile where that one loads h's
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    tile_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    k_steps = (K + BK - 1) // BK
    count = WHICH * k_steps
    out_tile, x_bar, phase = out_bufs.index(WHICH), x_ready.index(WHICH), 0
    for tile in range(gl.program_id(0) + WHICH * gl.num_programs(0), (M + BM - 1) // BM * ((N + BN - 1) // BN),
                      2 * gl.num_programs(0)):
        off_m, off_n = _tile_at(tile, M, N, BM, BN, False)
        tma.store_wait(0)  # the last tile's output has left out_tile
        mbarrier.expect(x_bar, x_desc.block_type.nbytes)
        _tma_load(x_desc, [off_m, off_n], x_bar, out_tile)
        acc, count = _matmul_tile(y_bufs, w_bufs, ready, empty, turn, count, phase, k_steps, layout, False, BM, BN,
                                  STAGES, WHICH)
        product = _bf16(acc)
        mbarrier.wait(x_bar, phase)
        out = _add_bf16(product, out_tile.load(layout))
        value = _f32_of_bf16(out)
        rows = off_m + tile_rows
        gl.store(squares + off_n // BN * M + rows, gl.sum(value * value, axis=1), mask=rows < M)
        out_tile.store(out)
        fence_async_shared()
        _tma_store(out_desc, [off_m, off_n], out_tile)
        phase ^= 1
    tma.store_wait(0)


# --- head_loss: the lm_head's training loss, fused and in chunks of tokens
# The lm_head matmul (FP8 head by @YouJiacheng), the soft cap and the cross entropy, with the gradients of x and w
# computed in the same pass, HEAD_CHUNK tokens at a time: the (tokens, V) logits never exist whole (at 64K tokens:
# 6.6 GB in bf16, 13 GB in float32). The backward only scales the saved gradients by the incoming one. In FP8, x
# and w go to float8_e4m3fn and the logits' gradient to float8_e5m2; _scaled_mm multiplies in FP8, undoes the
# scales. A chunk's logits become the loss and their gradient in _loss_and_logit_grad: on the GPU two Triton
# kernels, each reading the logits once, the second storing the gradient in both layouts that the FP8 matmuls need.
# In FP8 the gradient for w is one matmul over a span of GRAD_W_CHUNKS chunks, whose transposed gradients the
# kernel stores side by side: fewer float32 (V, D) partial products to add into grad_w. On Hopper the FP8 logits'
# matmul is a Gluon kernel whose epilogue also sums exp(z) over each tile's row, while the other warpgroup's matmul
# runs: the row sums' own pass over the logits is then a small kernel over those partial sums.

FP8_X_SCALE, FP8_W_SCALE = 2.0, 32.0
# The mean over the tokens makes each logit's gradient about 1/tokens: grad_s = 2^13 * tokens brings it into
# float8_e5m2's range (2^29 at the record's 65,536 tokens; a fixed 2^29 overflows at the smoke preset's 1024).
FP8_GRAD_SCALE_PER_TOKEN = 2.0**13
HEAD_CHUNK = 16384  # tokens a chunk: its logits are 1.6 GB in bf16
GRAD_W_CHUNKS = 2  # chunks a span: each one more holds another chunk's FP8 gradient (0.8 GB) until the span ends


# The row-sum kernel's block (rows x vocabulary) and the gradient kernel's tile, as benchmarks/logit_grad_check.py
# compares them
HEAD_LSE = Tile((1, 2048), warps=4, stages=3)
HEAD_GRAD = Tile((32, 64), warps=4, stages=3)
# On Hopper: the logits' FP8 matmul (rows, columns, depth) as the MLP's, and the rows and partial sums of a program
# of the kernel that adds those sums up
HEAD_MATMUL = Tile((128, 128, 128), warps=4, stages=4)
HEAD_SUMS = Tile((32, 64), warps=4, stages=2)


def head_loss_bf16(x: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """The mean cross entropy of softcap(x @ w.T) against targets, for x (tokens, D) bf16 and w (V, D), its
    matmuls in bf16."""
    return fused_head_loss(x, w, targets, False)[0]


def head_loss_fp8(x: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """head_loss_bf16 with its matmuls in FP8 (compute capability >= 8.9)."""
    return fused_head_loss(x, w, targets, True)[0]


def head_loss_fp8_hopper(x: Tensor, w: Tensor, targets: Tensor) -> Tensor:
    """head_loss_fp8 with the logits' row sums in the logits' matmul (Hopper, Gluon)."""
    return fused_head_loss(x, w, targets, True, True)[0]


class HeadSteps(NamedTuple):
    """The steps of the head loss's chunk loop that the GPU runs otherwise than the reference."""
    logits: Callable  # a chunk's inputs and w -> its logits, and their row sums of exp(z) by column block or None
    loss_and_logit_grad: Callable  # a chunk's logits -> its loss and the logits' gradient
    e4m3_both: Callable  # w -> its FP8 copies
    grad_x: Callable  # the logits' gradient -> the gradient for x
    add_grad_w: Callable  # grad_w + a span's gradient for w


def _head_loss_chunks(x: Tensor, w: Tensor, targets: Tensor, fp8: bool,
                      steps: HeadSteps) -> tuple[Tensor, Tensor, Tensor]:
    """fused_head_loss's loop over spans of GRAD_W_CHUNKS chunks (one chunk in bf16), with the device's steps."""
    if fp8:
        w_q, w_q_t = steps.e4m3_both(w, FP8_W_SCALE)
    else:
        w_q = w.bfloat16()
        w_q_t = w_q.T
    grad_s = FP8_GRAD_SCALE_PER_TOKEN * len(x) if fp8 else None
    loss = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x, grad_w = torch.empty_like(x), None
    span = HEAD_CHUNK * GRAD_W_CHUNKS if fp8 else HEAD_CHUNK
    for start in range(0, len(x), span):
        tokens = slice(start, start + span)
        x_q = _e4m3(x[tokens], FP8_X_SCALE) if fp8 else x[tokens]
        g_t = x.new_empty((len(w), len(x_q)), dtype=torch.float8_e5m2) if fp8 else None
        for chunk in range(0, len(x_q), HEAD_CHUNK):
            rows = slice(chunk, chunk + HEAD_CHUNK)
            g = None  # the last chunk's gradient goes before this chunk's logits are allocated
            logits, sums = steps.logits(x_q[rows], w_q)
            chunk_loss, g = steps.loss_and_logit_grad(logits, targets[tokens][rows], 1 / len(x), grad_s,
                                                      g_t[:, rows] if fp8 else None, sums)[:2]
            del logits, sums
            grad_x[tokens][rows] = steps.grad_x(g, w_q_t, grad_s)
            loss += chunk_loss
        grad_w = steps.add_grad_w(grad_w, g_t if fp8 else g.T, x_q, grad_s)  # in bf16 a span is a chunk: g.T is g_t
        del g, g_t  # before the next span's are allocated
    return loss / len(x), grad_x, grad_w.contiguous()  # the sum's layout may follow the transposed partial


@torch.library.custom_op("speedrun::head_loss", mutates_args=())
def fused_head_loss(x: Tensor, w: Tensor, targets: Tensor, fp8: bool,
                    sums_in_matmul: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """The mean cross entropy of softcap(x @ w.T) against targets, and its gradients.
    x (T, D) bf16, w (V, D) float32, targets (T,) int64 -> loss () float32, grad_x (T, D) bf16, grad_w (V, D)
    float32. fp8: the matmuls in FP8 (compute capability >= 8.9, or a recent CPU build), else in bf16.
    sums_in_matmul (with fp8, on Hopper): the logits' matmul is the Gluon kernel that also sums their rows. This
    body is the reference; on CUDA _fused_head_loss_cuda runs the same loop with Triton kernels and compiled
    steps."""
    steps = HeadSteps(_logits, _loss_and_logit_grad, _e4m3_both, _grad_x, _add_grad_w)
    return _head_loss_chunks(x, w, targets, fp8, steps)


@fused_head_loss.register_fake
def _(x: Tensor, w: Tensor, targets: Tensor, fp8: bool, sums_in_matmul: bool = False):
    assert x.ndim == w.ndim == 2 and x.shape[1] == w.shape[1] and targets.shape == x.shape[:1]
    return x.new_empty((), dtype=torch.float32), torch.empty_like(x), torch.empty_like(w, dtype=torch.float32)


def _head_loss_setup_context(ctx, inputs, output):
    loss, grad_x, grad_w = output
    ctx.save_for_backward(grad_x, grad_w)


def _head_loss_backward(ctx, grad_loss: Tensor, _grad_x, _grad_w):
    grad_x, grad_w = ctx.saved_tensors
    return grad_x * grad_loss, grad_w * grad_loss, None, None, None


fused_head_loss.register_autograd(_head_loss_backward, setup_context=_head_loss_setup_context)


def _e4m3(t: Tensor, scale: float) -> Tensor:
    return t.mul(scale).to(torch.float8_e4m3fn)


def _e4m3_both(t: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """_e4m3(t, scale), and a contiguous copy of it transposed: w_q is the first operand of the logits' matmul and
    the second of grad_x's, and _scaled_mm wants its first operand row-major, its second column-major."""
    t_q = _e4m3(t, scale)
    return t_q, t_q.T.contiguous()


def _logits(x_q: Tensor, w_q: Tensor) -> tuple[Tensor, None]:
    """x_q (n, D) and w_q (V, D), both bf16 or both float8_e4m3fn (scaled) -> the logits (n, V) in bf16, and no
    row sums."""
    if w_q.dtype != torch.float8_e4m3fn:
        return x_q @ w_q.T, None
    one = torch.ones((), dtype=torch.float32, device=x_q.device)
    return torch._scaled_mm(x_q, w_q.T, out_dtype=torch.bfloat16, scale_a=one / FP8_X_SCALE,
                            scale_b=one / FP8_W_SCALE, use_fast_accum=True), None


def _loss_and_logit_grad(logits: Tensor, targets: Tensor, inv_tokens: float, grad_s: float | None,
                         g_t: Tensor | None = None, sums: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The reference of the Triton kernels below. The logits (n, V) bf16 -> (the summed cross entropy of
    softcap(logits), the gradient g of inv_tokens * that sum for the logits, rounded to bf16; with grad_s (FP8):
    g * grad_s in float8_e5m2, and a copy transposed, written into g_t (V, n) if given). The reference sums the
    rows itself, whatever sums the matmul made."""
    s = torch.sigmoid(logits.float() / SOFTCAP_TEMPERATURE)
    z = SOFTCAP * s  # = softcap(logits)
    # z < 30, so the sum of exp(z) over the 50304 logits stays below 6e17: no max needs subtracting first
    lse = z.exp().sum(dim=1).log()
    loss = (lse - z.gather(1, targets[:, None]).squeeze(1)).sum()
    # d loss / d logits = (softmax(z) - onehot(target)) * dz / dlogits, where dz / dlogits = 30 s (1 - s) / 7.5;
    # rounded to bf16, the dtype of the logits, as autograd would
    p = (z - lse[:, None]).exp()
    dz = torch.where(torch.arange(z.size(1), device=z.device) == targets[:, None], p - 1, p)
    g = (dz * inv_tokens * SOFTCAP * s * (1 - s) / SOFTCAP_TEMPERATURE).bfloat16()
    if grad_s is None:
        return loss, g, None
    g = g.mul(grad_s).to(torch.float8_e5m2)
    return loss, g, g.T.contiguous() if g_t is None else g_t.copy_(g.T)


def _grad_x(g: Tensor, w_q_t: Tensor, grad_s: float | None) -> Tensor:
    """The logits' gradient g (n, V) against w_q_t (D, V) -> the gradient for x (n, D) bf16."""
    if grad_s is None:
        return g @ w_q_t.T
    one = torch.ones((), dtype=torch.float32, device=g.device)
    return torch._scaled_mm(g, w_q_t.T, out_dtype=torch.bfloat16, scale_a=one / grad_s, scale_b=one / FP8_W_SCALE)


def _add_grad_w(grad_w: Tensor | None, g_t: Tensor, x_q: Tensor, grad_s: float | None) -> Tensor:
    """grad_w + the gradient for w (V, D) float32 of n tokens: g_t (V, n) their logits' gradient transposed, x_q
    (n, D) their inputs; for the first span (grad_w None) that gradient alone, as it came, not added to zeros.
    _scaled_mm wants its second operand column-major: g_t contiguous is g transposed."""
    if grad_s is None:
        part = (g_t @ x_q).float()
    else:
        one = torch.ones((), dtype=torch.float32, device=g_t.device)
        # (D, n) @ (n, V) and a transpose is faster than (V, n) @ (n, D) for (V, D) = (50304, 768)
        part = torch._scaled_mm(x_q.T.contiguous(), g_t.T, out_dtype=torch.float32, scale_a=one / FP8_X_SCALE,
                                scale_b=one / grad_s).T
    return part if grad_w is None else grad_w + part


# Compiled on the GPU, once per shape: eagerly, the float8 transposed copy of w is a slow kernel of its own and
# the scaling and the cast two more; inductor makes the scales' small tensors in one kernel, and writes the
# transposed copy of x_q and the transposed add into grad_w. They never take --coordinate_descent_tuning, whose tile
# for the float8 transposed copy gave nonfinite values (the speed record's leads table); _e4m3_both under no_grad,
# because w comes in as the parameter.
HEAD_COMPILE = dict(dynamic=False, options={"coordinate_descent_tuning": False})
_e4m3_both_compiled = torch.compile(torch.no_grad()(_e4m3_both), **HEAD_COMPILE)
_grad_x_compiled = torch.compile(_grad_x, **HEAD_COMPILE)
_add_grad_w_compiled = torch.compile(_add_grad_w, **HEAD_COMPILE)


@fused_head_loss.register_kernel("cuda")
def _fused_head_loss_cuda(x: Tensor, w: Tensor, targets: Tensor, fp8: bool,
                          sums_in_matmul: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    steps = HeadSteps(_logits_gluon if fp8 and sums_in_matmul else _logits, _loss_and_logit_grad_triton,
                      _e4m3_both_compiled, _grad_x_compiled, _add_grad_w_compiled)
    return _head_loss_chunks(x, w, targets, fp8, steps)


def _loss_and_logit_grad_triton(logits: Tensor, targets: Tensor, inv_tokens: float, grad_s: float | None,
                                g_t: Tensor | None = None,
                                sums: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """_loss_and_logit_grad on the GPU: the row sums of exp(z) (from the matmul's sums, where it made them),
    then g tile by tile."""
    if not HAS_TRITON:
        raise RuntimeError("the GPU head loss needs Triton, as torch.compile does: pip install triton")
    n, V = logits.shape
    lse, losses = _row_lse_triton(logits, targets) if sums is None else _lse_of_sums_triton(sums, logits, targets)
    fp8 = grad_s is not None
    g = torch.empty_like(logits, dtype=torch.float8_e5m2 if fp8 else torch.bfloat16)
    if fp8 and g_t is None:
        g_t = logits.new_empty((V, n), dtype=torch.float8_e5m2)
    (rows, cols), warps, stages = HEAD_GRAD
    _logit_grad_kernel[(triton.cdiv(n, rows), triton.cdiv(V, cols))](
        logits, targets, lse, g, g_t if fp8 else g, n, V, g_t.stride(0) if fp8 else 0, inv_tokens, grad_s or 1.0, fp8,
        SOFTCAP, SOFTCAP_TEMPERATURE, rows, cols, num_warps=warps, num_stages=stages)
    return losses.sum(), g, g_t


def _row_lse_triton(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The row sums: logits (n, V) bf16 -> each row's log-sum-exp of z = softcap(logits) and its loss
    lse - z[target], both (n,) float32."""
    n, V = logits.shape
    lse, losses = logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)
    (rows, cols), warps, stages = HEAD_LSE
    _lse_kernel[(triton.cdiv(n, rows),)](logits, targets, lse, losses, n, V, SOFTCAP, SOFTCAP_TEMPERATURE, rows, cols,
                                         num_warps=warps, num_stages=stages)
    return lse, losses


def _lse_of_sums_triton(sums: Tensor, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """_row_lse_triton from the logits' matmul's partial row sums of exp(z), sums (V / BN, n) float32."""
    n = logits.size(0)
    lse, losses = logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)
    (rows, parts), warps, stages = HEAD_SUMS
    _lse_of_sums_kernel[(triton.cdiv(n, rows),)](sums, logits, targets, lse, losses, n, logits.size(1), len(sums),
                                                 SOFTCAP, SOFTCAP_TEMPERATURE, rows, parts, num_warps=warps,
                                                 num_stages=stages)
    return lse, losses


def _logits_gluon(x_q: Tensor, w_q: Tensor) -> tuple[Tensor, Tensor]:
    """_logits in FP8 by the Gluon kernel below -> the logits (n, V) bf16 and, for each of w's blocks of BN rows,
    each row's sum of exp(z) over its columns, (V / BN, n) float32. V is a multiple of BN (the lm_head's rows are
    padded to a multiple of 128)."""
    (BM, BN, BK), warps, stages = HEAD_MATMUL
    n, V = len(x_q), len(w_q)
    if V % BN:  # a last, partial tile of columns would be left out of the logits and their sums
        raise ValueError(f"HEAD_MATMUL's {BN} columns a tile must divide the lm_head's {V} rows: take 128 or 64")
    logits = x_q.new_empty((n, V), dtype=torch.bfloat16)
    sums = x_q.new_empty((V // BN, n), dtype=torch.float32)
    num_sms = torch.cuda.get_device_properties(x_q.device).multi_processor_count
    grid = (min(num_sms, triton.cdiv(n, BM) * (V // BN)),)
    _logits_kernel[grid](_gluon_tiles(x_q.contiguous(), [BM, BK]), _gluon_tiles(w_q, [BN, BK]),
                         _gluon_tiles(logits, [BM, BN]), sums, n, V, x_q.size(1), 1 / (FP8_X_SCALE * FP8_W_SCALE),
                         SOFTCAP, SOFTCAP_TEMPERATURE, BM, BN, BK, stages, num_warps=warps, maxnreg=168)
    return logits, sums


# The head loss's exponentials and reciprocals as the special-function unit's instructions alone: tl.exp and
# tl.fdiv wrap them in code that keeps subnormal results, which these kernels almost never meet (exp(z) >= 1,
# exp(z - lse) >= e^-41). The one exception: sigmoid(x / 7.5) for a logit x < -655 is flushed to 0, where the
# loss stays the same and the logit's gradient, below 2^-124 / tokens, rounds to 0 anyway in FP8, and in bf16
# from 1024 tokens up. The same bits, in less time.
LOG2E_KERNEL = tl.constexpr(LOG2E)


@triton.jit
def _special_kernel(x, INSTRUCTION: tl.constexpr):  # float32 -> float32 by one PTX instruction, as "rcp.approx.f32"
    return tl.inline_asm_elementwise(INSTRUCTION + " $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _exp_kernel(x):  # float32 -> e^x, as 2^(x log2 e)
    return _special_kernel(x * LOG2E_KERNEL, "ex2.approx.ftz.f32")


@triton.jit
def _sigmoid_kernel(logits, TEMPERATURE: tl.constexpr):  # float32 -> sigmoid(logits / TEMPERATURE)
    return _special_kernel(1.0 + _exp_kernel(logits * (-1.0 / TEMPERATURE)), "rcp.approx.ftz.f32")


@triton.jit
def _exp_softcap_kernel(logits, CAP: tl.constexpr, TEMPERATURE: tl.constexpr):
    # float32 -> about exp(CAP sigmoid(logits / TEMPERATURE)), for the row sums alone: the sigmoid as
    # (1 + tanh(x / 2)) / 2, so that with the exp it takes two special-function instructions a logit where
    # _sigmoid_kernel takes three, and its scalings and the exp's fold into one multiply-add: 2^(A tanh + A) for
    # A = CAP log2(e) / 2. Its soft cap is off by up to 1.1e-4 (at |logits| 4 to 64), so a row's log-sum-exp and
    # loss are too; each row of the gradient scales by as little, 30 times less than its rounding to bf16. The val
    # loss is computed apart, exactly.
    A: tl.constexpr = CAP * LOG2E_KERNEL * 0.5
    return _special_kernel(_special_kernel(logits * (0.5 / TEMPERATURE), "tanh.approx.f32") * A + A,
                           "ex2.approx.ftz.f32")


@triton.jit
def _lse_kernel(logits, targets, lse, losses, n, V, CAP: tl.constexpr, TEMPERATURE: tl.constexpr,
                ROWS: tl.constexpr, COLS: tl.constexpr):
    # ROWS rows of the logits (n, V) bf16 -> lse = log(sum(exp(z))) and the loss lse - z[target], z = softcap
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    row_start = rows.to(tl.int64) * V
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, V, COLS):
        cols = start + tl.arange(0, COLS)
        ok = row_ok[:, None] & (cols < V)[None, :]
        z = tl.load(logits + row_start[:, None] + cols[None, :], mask=ok).to(tl.float32)
        total += tl.sum(tl.where(ok, _exp_softcap_kernel(z, CAP, TEMPERATURE), 0.0), axis=1)
    _store_lse_and_losses(total, logits, targets, lse, losses, rows, row_ok, V, CAP, TEMPERATURE)


@triton.jit
def _lse_of_sums_kernel(sums, logits, targets, lse, losses, n, V, PARTS, CAP: tl.constexpr,
                        TEMPERATURE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # _lse_kernel's results from sums (PARTS, n), each row's sums of exp(z) over blocks of its columns
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n
    total = tl.zeros((ROWS,), dtype=tl.float32)
    for start in range(0, PARTS, BLOCK):
        parts = start + tl.arange(0, BLOCK)
        ok = (parts < PARTS)[:, None] & row_ok[None, :]
        total += tl.sum(tl.load(sums + parts[:, None] * n + rows[None, :], mask=ok, other=0.0), axis=0)
    _store_lse_and_losses(total, logits, targets, lse, losses, rows, row_ok, V, CAP, TEMPERATURE)


@triton.jit
def _store_lse_and_losses(total, logits, targets, lse, losses, rows, row_ok, V, CAP: tl.constexpr,
                          TEMPERATURE: tl.constexpr):
    # the rows' sums of exp(z) -> lse = log(total) and the loss lse - z[target], stored
    row_lse = tl.log(total)
    z_target = CAP * _sigmoid_kernel(tl.load(logits + rows.to(tl.int64) * V + tl.load(targets + rows, mask=row_ok),
                                             mask=row_ok).to(tl.float32), TEMPERATURE)
    tl.store(lse + rows, row_lse, mask=row_ok)
    tl.store(losses + rows, row_lse - z_target, mask=row_ok)


@triton.jit
def _logit_grad_kernel(logits, targets, lse, g, g_t, n, V, t_stride, inv_tokens, grad_s, FP8: tl.constexpr,
                       CAP: tl.constexpr, TEMPERATURE: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    # A (ROWS, COLS) tile of the logits -> the same tile of g, as _loss_and_logit_grad computes it; in FP8 also
    # stored transposed into g_t (V, n), whose rows are t_stride apart
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
    ok = (rows < n)[:, None] & (cols < V)[None, :]
    offsets = rows.to(tl.int64)[:, None] * V + cols[None, :]
    s = _sigmoid_kernel(tl.load(logits + offsets, mask=ok).to(tl.float32), TEMPERATURE)
    p = _exp_kernel(CAP * s - tl.load(lse + rows, mask=rows < n)[:, None])
    dz = tl.where(cols[None, :] == tl.load(targets + rows, mask=rows < n)[:, None], p - 1, p)
    grad = _bf16(dz * inv_tokens * (CAP / TEMPERATURE) * s * (1 - s))  # = dz / dlogits
    if FP8:
        grad = (grad.to(tl.float32) * grad_s).to(tl.float8e5)
        t_offsets = cols.to(tl.int64)[:, None] * t_stride + rows[None, :]
        tl.store(g_t + t_offsets, tl.trans(grad), mask=tl.trans(ok))
    tl.store(g + offsets, grad, mask=ok)


# The logits' FP8 matmul on Hopper: the MLP's ping-pong kernel (its loading warp and matmul loop), with tiles taken
# down the columns (w's row blocks in turn, each against every row block of the chunk's x, which stays in L2), and an
# epilogue that stores the logits and the tile's row sums of exp(z) as _lse_kernel computes them.


@gluon.jit
def _logits_kernel(x_desc, w_desc, out_desc, sums, M, N, K, SCALE: gl.constexpr, CAP: gl.constexpr,
                   TEMPERATURE: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
                   STAGES: gl.constexpr):
    # out = x @ w.T * SCALE, rounded to bf16, as _scaled_mm makes it; sums[n // BN, m] = the sum of exp(z) over
    # the tile's columns of row m
    x_bufs, w_bufs, ready, empty, out_bufs, turn = _matmul_buffers(x_desc, w_desc, out_desc, STAGES)
    gl.warp_specialize([
        (_logits_consumer, (out_desc, sums, x_bufs, w_bufs, ready, empty, out_bufs, turn, M, N, K, SCALE, CAP,
                            TEMPERATURE, BM, BN, BK, STAGES, 0)),
        (_logits_consumer, (out_desc, sums, x_bufs, w_bufs, ready, empty, out_bufs, turn, M, N, K, SCALE, CAP,
                            TEMPERATURE, BM, BN, BK, STAGES, 1)),
        (_matmul_loads, (x_desc, w_desc, x_bufs, w_bufs, ready, empty, M, N, K, False, True, BM, BN, BK, STAGES)),
    ], [4, 1], [240, 24])


@gluon.jit
def _logits_consumer(out_desc, sums, x_bufs, w_bufs, ready, empty, out_bufs, turn, M, N, K, SCALE: gl.constexpr,
                     CAP: gl.constexpr, TEMPERATURE: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr,
                     BK: gl.constexpr, STAGES: gl.constexpr, WHICH: gl.constexpr):
    # warpgroup WHICH, as _matmul_relu2_consumer: every other tile, its matmul, then its epilogue
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
    k_steps = (K + BK - 1) // BK
    count = WHICH * k_steps
    out_tile, phase = out_bufs.index(WHICH), 0
    tile_rows = gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    for tile in range(gl.program_id(0) + WHICH * gl.num_programs(0), (M + BM - 1) // BM * ((N + BN - 1) // BN),
                      2 * gl.num_programs(0)):
        off_m, off_n = _tile_at(tile, M, N, BM, BN, True)
        tma.store_wait(0)  # the last tile's logits have left out_tile
        acc, count = _matmul_tile(x_bufs, w_bufs, ready, empty, turn, count, phase, k_steps, layout, False, BM, BN,
                                  STAGES, WHICH)
        z = _bf16(acc * SCALE)
        out_tile.store(z)
        fence_async_shared()
        _tma_store(out_desc, [off_m, off_n], out_tile)
        exp_z = _exp_softcap_kernel(_f32_of_bf16(z), CAP, TEMPERATURE)
        rows = off_m + tile_rows
        gl.store(sums + off_n // BN * M + rows, gl.sum(exp_z, axis=1), mask=rows < M)
        phase ^= 1
    tma.store_wait(0)


# ----------------------------------------------------------------------------------------------------------------
# Until bind_ops() binds this run's, the ops are the plain implementations, which run on any device
attention_masks, attention, attention_inputs = block_masks, attention_dense, attention_inputs_reference
attention_block, residual_projection = attention_block_reference, residual_projection_reference
relu2_mlp, head_loss = relu2_mlp_reference, head_loss_bf16


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # Triton's kernels fuse a * b + c into one instruction by default; Triton 3.9 warns, once a process, that 3.10
    # makes that opt-in: opted in, the kernels compute as they do under 3.6 and no rank prints the warning
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    checks = [arg for arg in sys.argv[1:] if arg.startswith("--check=")]
    argv = [arg for arg in sys.argv[1:] if arg not in checks]
    stops = Stops(rank=int(os.environ.get("RANK", 0)))
    try:
        if checks:
            check_launch(argv, _convert("check", checks[-1].partition("=")[2], int))
        else:
            main(argv, stops)
    except (ConfigError, DataError) as e:
        # under torchrun every rank of a node finds the same error: one a node says it (so, on one node, rank 0)
        if os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (Exception, Interrupted) as e:
        code = stops.exit_code(e)  # a signal, a write that failed, a collective: one line; else a bug's traceback
        if code is None:
            raise
        sys.exit(code)
