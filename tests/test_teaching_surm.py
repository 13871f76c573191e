"""boftlab.teaching.surm: best structured approximations (exact projections, Van Loan–Pitsianis, alternating least
squares for LDR) and the figures of notebook 05."""

import pytest
import torch
from matplotlib.figure import Figure

from boftlab.surm import circulant, ldr, resolve_kronecker_shape, toeplitz
from boftlab.teaching.surm import (
    approximation_error,
    best_approximation,
    error_curves,
    fit_ldr,
    plot_error_vs_parameters,
    plot_structure,
)

F64 = torch.float64


def random_member(structure: str, d_out: int, d_in: int) -> torch.Tensor:
    """A random (d_out, d_in) float64 matrix of ``structure`` (Kronecker: the default factor shapes)."""
    if structure == "circulant":
        return circulant(torch.randn(max(d_out, d_in), dtype=F64), d_out, d_in)
    if structure == "toeplitz":
        return toeplitz(torch.randn(d_out + d_in - 1, dtype=F64), d_out, d_in)
    m1, n1 = resolve_kronecker_shape(d_out, d_in, None)
    return torch.kron(torch.randn(m1, n1, dtype=F64), torch.randn(d_out // m1, d_in // n1, dtype=F64))


@pytest.mark.parametrize("d_out,d_in", [(12, 12), (8, 12), (12, 8)])
def test_structured_targets_are_recovered_exactly(d_out, d_in):
    for structure in ("circulant", "toeplitz", "kronecker"):
        target = random_member(structure, d_out, d_in)
        assert approximation_error(target, structure) < 1e-12, structure
    low_rank = torch.randn(d_out, 2, dtype=F64) @ torch.randn(2, d_in, dtype=F64)
    assert approximation_error(low_rank, "low_rank", rank=2) < 1e-12


def test_projections_are_optimal():
    target = torch.randn(10, 14, dtype=F64)
    for structure in ("circulant", "toeplitz"):  # linear classes: best + any member is a member
        best = best_approximation(target, structure)
        for _ in range(5):
            other = best + 0.01 * random_member(structure, 10, 14)
            assert torch.linalg.matrix_norm(target - other) > torch.linalg.matrix_norm(target - best)
    best = best_approximation(target, "kronecker")  # A 2 × 2 ⊗ B 5 × 7 (default shape for 10 × 14)
    rearranged = best.reshape(2, 5, 2, 7).permute(0, 2, 1, 3).reshape(4, 35)  # rank 1: vec(A) vec(B)ᵀ
    u, s, vh = torch.linalg.svd(rearranged)
    a, b = (s[0] * u[:, 0]).reshape(2, 2), vh[0].reshape(5, 7)
    assert torch.allclose(torch.kron(a, b), best, atol=1e-12)
    for _ in range(5):  # moving either factor moves away from the target
        other = torch.kron(a + 0.01 * torch.randn(2, 2, dtype=F64), b + 0.01 * torch.randn(5, 7, dtype=F64))
        assert torch.linalg.matrix_norm(target - other) > torch.linalg.matrix_norm(target - best)


def test_fit_ldr_recovers_an_ldr_target_and_never_gets_worse():
    target = ldr(torch.randn(1, 8, dtype=F64), torch.randn(1, 8, dtype=F64))
    assert approximation_error(target, "ldr", displacement_rank=1, sweeps=60) < 1e-8
    noise = torch.randn(16, 16, dtype=F64)
    errors = [approximation_error(noise, "ldr", displacement_rank=2, sweeps=s) for s in (1, 2, 4, 8)]
    assert errors[0] <= approximation_error(noise, "circulant") + 1e-12  # circulants are LDR r=1 (h = e_0)
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))
    g, h = fit_ldr(noise, 16, sweeps=30)
    assert torch.allclose(ldr(g, h), noise, atol=1e-8)  # r = n: every matrix is reachable


def test_error_curves_and_figures():
    target = torch.randn(12, 12, dtype=F64)
    rows = error_curves(target, ranks=[1, 2], sweeps=3)
    structures = {r["structure"] for r in rows}
    assert structures == {"low_rank", "ldr", "circulant", "toeplitz", "kronecker"}
    assert all(0 <= r["error"] <= 1 + 1e-12 for r in rows)
    assert {r["setting"] for r in rows if r["structure"] == "kronecker"} == {"A 2×2", "A 3×3", "A 4×4", "A 6×6"}
    fig = plot_error_vs_parameters(rows, "noise")
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 5
    fig = plot_structure(target, "ldr", displacement_rank=2, sweeps=3)
    assert len(fig.axes) == 3
    error = approximation_error(target, "ldr", displacement_rank=2, sweeps=3)
    assert f"{2 * 2 * 12} numbers, relative error {error:.3f}" in fig._suptitle.get_text()


def test_plot_structure_clips_its_colour_scale_so_a_strong_diagonal_does_not_blank_the_rest():
    target = torch.eye(200, dtype=F64) * 100 + torch.randn(200, 200, generator=torch.Generator().manual_seed(0), dtype=F64)
    fig = plot_structure(target, "toeplitz")
    low, high = fig.axes[0].images[0].get_clim()
    assert high < 10 and low == -high  # the off-diagonal noise (|x| ≲ 3) gets the colours, the diagonal saturates
