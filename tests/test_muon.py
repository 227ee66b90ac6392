"""Muon: the Newton-Schulz iteration against a float64 SVD (its output's singular values land in the expected
band, with the input's singular vectors), and the distributed optimizer: on 2 gloo ranks both ranks end with
bit-identical parameters, equal to those of the same steps on 1 rank without a process group."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train_gpt import Muon, newton_schulz5


def scalar_map(x: np.ndarray) -> np.ndarray:
    """What 5 quintic steps do to one normalised singular value, in exact arithmetic."""
    for _ in range(5):
        x = 3.4445 * x - 4.7750 * x**3 + 2.0315 * x**5
    return x


@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (3, 64, 64)], ids=["tall", "wide", "batched"])
def test_newton_schulz_singular_values(shape):
    gen = torch.Generator().manual_seed(0)
    U, _, Vh = torch.linalg.svd(torch.randn(*shape, generator=gen, dtype=torch.float64), full_matrices=False)
    S = torch.logspace(0, -1.5, U.size(-1), dtype=torch.float64).expand(*shape[:-2], -1)  # condition 30
    G = U @ torch.diag_embed(S) @ Vh
    out = newton_schulz5(G.float()).double()
    assert out.shape == G.shape and not out.isnan().any()
    singular = torch.linalg.svdvals(out)
    assert singular.min() > 0.6 and singular.max() < 1.3  # exact arithmetic gives [0.68, 1.21] here
    # out = U f(S) V^T: the input's singular vectors, each singular value mapped by the scalar iteration
    core = U.mT @ out @ Vh.mT
    diag = torch.diagonal(core, dim1=-2, dim2=-1)
    expected = scalar_map((S / torch.linalg.matrix_norm(G, keepdim=True)[..., 0]).numpy())
    np.testing.assert_allclose(diag.numpy(), expected, atol=0.06)
    assert (core - torch.diag_embed(diag)).norm() / core.norm() < 0.05


SHAPES = [(3, 32, 32)] * 3 + [(128, 32)] * 3 + [(32, 128)] * 2 + [(32, 32)] * 3  # odd group sizes: padding


def muon_run(rank: int, world_size: int) -> list[torch.Tensor]:
    """3 Muon steps from a fixed start with fixed gradients, which differ between 2 ranks: one rank alone gets
    their mean, as Muon computes it (a sum, then a halving)."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in SHAPES]
    opt = Muon(params, lr=0.05, momentum=0.9, rank=rank, world_size=world_size)
    for _ in range(3):
        for p in params:
            grads = [torch.randn(p.shape, generator=gen) for _ in range(2)]
            p.grad = grads[rank] if world_size == 2 else (grads[0] + grads[1]) / 2
        opt.step()
    return [p.detach().clone() for p in params]


def _worker(rank: int, world_size: int, port: int, out_dir: str):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.save(muon_run(rank, world_size), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_muon_two_ranks_match_one(tmp_path, free_port):
    mp.spawn(_worker, args=(2, free_port, str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    single = muon_run(rank=0, world_size=1)
    for a, b, c in zip(rank0, rank1, single):
        assert torch.equal(a, b)  # bit-identical on both ranks
        assert torch.equal(a, c)  # and the same as one rank


def test_muon_step_size_follows_shape():
    """Without momentum a step moves a parameter by -lr * sqrt(max(1, rows / cols)) * newton_schulz5(grad)."""
    for shape, scale in [((128, 32), 2.0), ((32, 128), 1.0)]:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape)
        expected = -0.1 * scale * newton_schulz5(p.grad.clone()).float()
        Muon([p], lr=0.1, momentum=0.0).step()
        torch.testing.assert_close(p.detach(), expected, atol=1e-6, rtol=0)


def test_muon_orthogonalizes_each_shape_in_one_call():
    """The matrices of one group and shape go through newton_schulz5 as one batch (tall ones transposed), and
    each parameter gets exactly the update it gets alone."""
    shapes = [(128, 32), (32, 128), (32, 128), (4, 32, 32), (32, 32)]  # groups by size: 4096 (3 + 1 shapes), 1024
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in shapes]
    grads = [torch.randn(*shape, generator=gen) for shape in shapes]
    batches = []

    def orthogonalize(G):
        batches.append(tuple(G.shape))
        return newton_schulz5(G)

    expected = [p.detach().clone().add_(newton_schulz5(g), alpha=-0.1 * max(1, p.size(-2) / p.size(-1)) ** 0.5)
                for p, g in zip(params, grads)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    Muon(params, lr=0.1, momentum=0.0, orthogonalize=orthogonalize).step()
    assert sorted(batches) == [(1, 32, 32), (3, 32, 128), (4, 32, 32)]
    for p, e in zip(params, expected):
        assert torch.equal(p.detach(), e)
