"""Best structured approximations and their figures, for notebook 05: how close circulant, Toeplitz, Kronecker, LDR
and low-rank matrices come to a given weight, at how many stored numbers.

The structured matrices themselves (and the SURM layer) are in ``boftlab.surm``; this module only fits them to a
target and draws the result. Tested in ``tests/test_teaching_surm.py``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ..contract import nearest
from ..surm import STRUCTURES, check_displacement_rank, divisors, ldr, parameter_count, resolve_kronecker_shape


# --- best approximations ---------------------------------------------------------------------------------------------
def _diagonal_means(target: torch.Tensor, index: torch.Tensor, n_values: int) -> torch.Tensor:
    """Mean of target's entries per index value: the orthogonal projection onto matrices constant on each index set."""
    sums = torch.zeros(n_values, dtype=target.dtype).index_add_(0, index.reshape(-1), target.reshape(-1))
    counts = torch.bincount(index.reshape(-1), minlength=n_values).to(target.dtype)
    return sums / counts.clamp_min(1)


def fit_ldr(
    target: torch.Tensor, displacement_rank: int, sweeps: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n) -> g, h: (r, n), an LDR matrix Σ Z_1(g_i)·Z_{−1}(h_i) near ``target`` by alternating least squares.

    L is linear in g for fixed h and in h for fixed g, and the FFT turns each half-step into n independent tiny
    least-squares problems (one per frequency k, r unknowns each):

    * g-step: Z_1(g) = F⁻¹ diag(F g) F, so row k of F·L is Σ_i (F g_i)_k · row k of F·Z_{−1}(h_i);
    * h-step: Z_{−1}(h) = W⁻¹ diag(W h) W with W = F·diag(ω^j), ω = e^{iπ/n} (the "twisted" FFT), so column k of
      L·W⁻¹ is Σ_i (W h_i)_k · column k of Z_1(g_i)·W⁻¹.

    F and W are unitary up to a scale, so each half-step is the exact least-squares optimum in the original
    Frobenius norm and the error never increases. Starting from h_1 = e_0 (so Z_{−1}(h_1) = I), the first g-step
    already includes the best circulant: the fit is never worse than the circulant projection. O(sweeps·r·n² log n).
    """
    target = target.double()
    n = target.shape[-1]
    check_displacement_rank(displacement_rank, n)
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(displacement_rank, n, generator=generator, dtype=torch.float64) / math.sqrt(n)
    h[0] = 0.0
    h[0, 0] = 1.0  # Z_{−1}(e_0) = I: the first g-step already contains the best circulant, so we never do worse
    twist = torch.exp(1j * math.pi * torch.arange(n, dtype=torch.float64) / n)  # ω^j
    target_rows = torch.fft.fft(target, dim=0)  # F·T
    target_cols = torch.fft.ifft(target / twist, dim=1)  # T·W⁻¹ = (T·diag(ω^−j))·F⁻¹

    def solve(design: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Per-frequency least squares via the r × r normal equations: design (n_k, n, r), rhs (n_k, n) -> (n_k, r)."""
        design = design.contiguous()  # batched complex matmuls on permuted strides are ~100× slower
        gram = design.mH @ design  # (n_k, r, r)
        moment = design.mH @ rhs.contiguous().unsqueeze(-1)  # (n_k, r, 1)
        return torch.linalg.lstsq(gram, moment, driver="gelsd").solution.squeeze(-1)  # gelsd: rank-deficient safe

    i = torch.arange(n)
    wrapped = (i[:, None] - i[None, :]) % n  # C[i, j] = c[wrapped[i, j]]
    sign = torch.where(i[:, None] >= i[None, :], 1.0, -1.0).double()  # skew-circulant: minus above the diagonal
    for _ in range(sweeps):
        skews = h[:, wrapped] * sign  # (r, n, n): Z_{−1}(h_i)
        design = torch.fft.fft(skews, dim=1).permute(1, 2, 0)  # (k, column, i): row k of F·Z_{−1}(h_i)
        g = torch.fft.ifft(solve(design, target_rows).T, dim=-1).real  # (r, n)
        circulants = g[:, wrapped]  # (r, n, n): Z_1(g_i)
        design = torch.fft.ifft(circulants / twist, dim=2).permute(2, 1, 0)  # (k, row, i): column k of C_i·W⁻¹
        h = (torch.fft.ifft(solve(design, target_cols.T).T, dim=-1) / twist).real  # W⁻¹·ĥ, (r, n)
    return g, h


def best_approximation(
    target: torch.Tensor,
    structure: str,
    displacement_rank: int = 1,
    kronecker_shape: tuple[int, int] | None = None,
    rank: int = 1,
    sweeps: int = 10,
) -> torch.Tensor:
    """(d_out, d_in) -> the structured matrix nearest to ``target`` in Frobenius norm, (d_out, d_in), float64.

    Exact optima: circulant and Toeplitz (orthogonal projections: means along the (wrapped) diagonals), Kronecker
    (Van Loan–Pitsianis: the best rank-1 approximation of the rearranged matrix), ``"low_rank"`` (truncated SVD).
    LDR is bilinear, so no closed form is known: ``fit_ldr`` (``sweeps`` rounds of alternating least squares on the
    zero-padded square target) gives an upper bound on the best LDR error.
    """
    target = target.double()
    d_out, d_in = target.shape
    i, j = torch.arange(d_out)[:, None], torch.arange(d_in)[None, :]
    if structure == "circulant":
        size = max(d_out, d_in)
        index = (i - j) % size
        return _diagonal_means(target, index, size)[index]
    if structure == "toeplitz":
        index = i - j + d_in - 1
        return _diagonal_means(target, index, d_out + d_in - 1)[index]
    if structure == "kronecker":
        m1, n1 = resolve_kronecker_shape(d_out, d_in, kronecker_shape)
        m2, n2 = d_out // m1, d_in // n1
        rearranged = target.reshape(m1, m2, n1, n2).permute(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
        u, s, vh = torch.linalg.svd(rearranged, full_matrices=False)
        return s[0] * torch.kron(u[:, 0].reshape(m1, n1), vh[0].reshape(m2, n2))
    if structure == "low_rank":
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    if structure == "ldr":
        size = max(d_out, d_in)
        g, h = fit_ldr(F.pad(target, (0, size - d_in, 0, size - d_out)), displacement_rank, sweeps)
        return ldr(g, h)[:d_out, :d_in]
    raise ValueError(f"unknown structure {structure!r}; valid: {STRUCTURES + ('low_rank',)}")


def approximation_error(target: torch.Tensor, structure: str, **options: Any) -> float:
    """Relative Frobenius error ‖target − best‖ / ‖target‖ of ``best_approximation(target, structure, **options)``."""
    best = best_approximation(target, structure, **options)
    return float(torch.linalg.matrix_norm(target.double() - best) / torch.linalg.matrix_norm(target.double()))


def error_curves(
    target: torch.Tensor, ranks: list[int], sweeps: int = 10
) -> list[dict[str, Any]]:
    """Rows {structure, setting, parameters, error} for low rank and LDR at each rank r, circulant, Toeplitz and every
    Kronecker shape A: m1 × n1 with 1 < m1 < d_out and n1/d_in ≈ m1/d_out — the data behind ``plot_error_vs_parameters``."""
    d_out, d_in = target.shape
    rows = []
    for r in ranks:
        for structure, key in (("low_rank", "rank"), ("ldr", "displacement_rank")):
            options = {key: r, **({"sweeps": sweeps} if structure == "ldr" else {})}
            rows.append({"structure": structure, "setting": f"r={r}",
                         "parameters": parameter_count(structure, d_out, d_in, **{key: r}),
                         "error": approximation_error(target, structure, **options)})
    for structure in ("circulant", "toeplitz"):
        rows.append({"structure": structure, "setting": "", "parameters": parameter_count(structure, d_out, d_in),
                     "error": approximation_error(target, structure)})
    shapes = {(m1, nearest(round(m1 * d_in / d_out), divisors(d_in))) for m1 in divisors(d_out)[1:-1]}
    for shape in sorted(shapes):
        rows.append({"structure": "kronecker", "setting": f"A {shape[0]}×{shape[1]}",
                     "parameters": parameter_count("kronecker", d_out, d_in, kronecker_shape=shape),
                     "error": approximation_error(target, "kronecker", kronecker_shape=shape)})
    return rows


def plot_error_vs_parameters(rows: list[dict[str, Any]], title: str = "") -> Figure:
    """Figure: relative approximation error against stored numbers, one series per structure (log-x)."""
    fig = Figure(figsize=(6.5, 4), layout="tight")
    ax = fig.subplots()
    # Kronecker points unjoined: several factor shapes share a parameter count
    styles = {"low_rank": "o-", "ldr": "s-", "kronecker": "^", "circulant": "D", "toeplitz": "P"}
    for structure, style in styles.items():
        points = sorted((r["parameters"], r["error"]) for r in rows if r["structure"] == structure)
        if points:
            ax.plot(*zip(*points), style, label=structure.replace("_", " "))
    ax.set_xscale("log")
    ax.set_xlabel("stored numbers")
    ax.set_ylabel("relative Frobenius error")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def plot_structure(target: torch.Tensor, structure: str, displacement_rank: int = 1, sweeps: int = 10) -> Figure:
    """Figure: target, its best ``structure`` approximation and the residual, titled with error and parameter count.

    ``displacement_rank`` is the LDR r and the rank of ``"low_rank"``; other structures ignore it.
    """
    d_out, d_in = target.shape
    options: dict[str, Any] = {}
    if structure == "ldr":
        options = {"displacement_rank": displacement_rank, "sweeps": sweeps}
    elif structure == "low_rank":
        options = {"rank": displacement_rank}
    best = best_approximation(target, structure, **options)
    error = float(torch.linalg.matrix_norm(target.double() - best) / torch.linalg.matrix_norm(target.double()))
    count_options = {k: v for k, v in options.items() if k != "sweeps"}
    n_params = parameter_count(structure, d_out, d_in, **count_options)
    fig = Figure(figsize=(11, 3.6), layout="tight")
    axes = fig.subplots(1, 3)
    # one colour scale for the three panels, clipped at the 99th percentile of |target| so that a strong diagonal does
    # not wash out everything else
    magnitudes = target.detach().abs().flatten()
    limit = float(magnitudes.kthvalue(max(1, int(0.99 * magnitudes.numel()))).values)
    for ax, matrix, name in zip(axes, (target, best, target.double() - best), ("target", structure, "residual")):
        ax.imshow(matrix.detach().cpu().numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{structure}: {n_params} numbers, relative error {error:.3f}")
    return fig
