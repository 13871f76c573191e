"""How much of the orthogonal group BOFT(m, b) and OFT reach: fit orthogonal targets, compare at equal budgets.

The experiment of the BOFT paper's Fig. 5 (and App. I, Fig. 19): take a target rotation T ∈ SO(d), fit the
R = B_m ⋯ B_1 of a ``BOFTLayer`` (``boftlab.butterfly``, Cayley-parameterised blocks) by gradient descent on
‖R − T‖_F², and report the relative error ‖R − T‖_F / ‖T‖_F = ‖R − T‖_F / √d against the number of free parameters
m·(d/b)·b(b−1)/2. Zero is a perfect fit; the identity (no adaptation) scores √(2 − 2·tr(T)/d) ≈ √2 for a random T.

Targets live in SO(d), not O(d): every Cayley block has determinant +1, so no BOFT/OFT matrix can reach det −1.
For notebook 04; tested in ``tests/test_teaching_expressivity.py``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter
from torch import nn

from ..butterfly import BOFTConfig, BOFTLayer, valid_n_factors
from ..tensor_core import orthonormal_columns


# --- targets ----------------------------------------------------------------------------------------------------------
def random_rotation(dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(d, d) Haar-random rotation in SO(d): a Haar-random orthogonal matrix (``orthonormal_columns``: QR of a
    Gaussian with R's diagonal made positive, Mezzadri 2007) with one column flipped if its determinant is −1. O(d³)."""
    q = orthonormal_columns(dim, dim, torch.float64, None, generator)
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]  # the reflection maps Haar on O(d)∖SO(d) onto Haar on SO(d)
    return q.float()


def nearest_rotation(weight: torch.Tensor) -> torch.Tensor:
    """(d, d) weight -> the rotation closest to it in Frobenius norm (orthogonal polar factor U·Vᵀ, det +1). O(d³)."""
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"nearest_rotation needs a square matrix, got shape {tuple(weight.shape)}")
    u, _, vh = torch.linalg.svd(weight.double())
    if torch.linalg.det(u @ vh) < 0:
        u[:, -1] = -u[:, -1]  # flip the direction of the smallest singular value: closest matrix in SO(d)
    return (u @ vh).float()


# --- fitting ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fit:
    """One fitted structure: its (block_size, n_factors), free parameters, final relative error, and the layer."""

    block_size: int
    n_factors: int
    n_params: int
    error: float
    layer: BOFTLayer

    @property
    def name(self) -> str:
        return f"OFT(b={self.block_size})" if self.n_factors == 1 else f"BOFT(m={self.n_factors}, b={self.block_size})"


def relative_error(rotation: torch.Tensor, target: torch.Tensor) -> float:
    """‖R − T‖_F / ‖T‖_F."""
    return ((rotation - target).norm() / target.norm()).item()


def fit_rotation(target: torch.Tensor, block_size: int, n_factors: int, steps: int = 200, lr: float = 0.05) -> Fit:
    """Fit BOFT(m, b) (OFT when m = 1) to ``target`` (d, d) with Adam on ‖R − T‖_F². O(steps·d²·b·m).

    Starts from R = I, the adapter's own initialisation, on ``target``'s device. Raises the butterfly's ValueError for
    an invalid (d, b, m). On CPU it runs on one thread: the blocks are tiny and thread hand-offs cost more than they
    save (5× on a busy 2-core machine).
    """
    dim = target.shape[0]
    config = BOFTConfig(block_size=block_size, n_factors=n_factors, scale=False)
    layer = config.make_layer(nn.Linear(dim, dim, bias=False, device=target.device))
    optimizer = torch.optim.Adam([layer.skew], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    threads = torch.get_num_threads()
    if target.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for _ in range(steps):
            loss = (layer.rotation() - target).pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        error = relative_error(layer.rotation(), target)
    return Fit(block_size, n_factors, layer.n_trainable(), error, layer)


def structures(dim: int, block_sizes: list[int]) -> list[tuple[int, int]]:
    """Every valid (block_size, n_factors) for the given block sizes, from OFT (m = 1) to the dense butterfly."""
    return [(b, m) for b in block_sizes for m in valid_n_factors(dim, b)]


def sweep(targets: list[torch.Tensor], grid: list[tuple[int, int]], steps: int = 200, lr: float = 0.05,
          progress: bool = False) -> list[dict]:
    """Fit every (block_size, n_factors) of ``grid`` to every target; one row per structure with mean/std error."""
    from tqdm.auto import tqdm

    rows = []
    for b, m in tqdm(grid, disable=not progress, desc="structures"):
        fits = [fit_rotation(t, b, m, steps, lr) for t in targets]
        errors = torch.tensor([f.error for f in fits])
        rows.append({
            "structure": fits[0].name, "block_size": b, "n_factors": m, "n_params": fits[0].n_params,
            "error": errors.mean().item(), "error_std": errors.std().item() if len(fits) > 1 else 0.0,
        })
    return rows


def frontier(rows: list[dict]) -> list[dict]:
    """The rows no other row beats with fewer or equal parameters (the error-vs-budget Pareto front), by budget."""
    best, out = math.inf, []
    for row in sorted(rows, key=lambda r: (r["n_params"], r["error"])):
        if row["error"] < best:
            best = row["error"]
            out.append(row)
    return out


# --- interpolation between identity and the fit ----------------------------------------------------------------------
@torch.no_grad()
def factor_path(layer: BOFTLayer, target: torch.Tensor) -> list[dict]:
    """The BOFT paper's Fig. 10 on matrices: keep the first j trained factors, set the rest to I, for j = 0 … m.

    Every point is an orthogonal matrix R_j = B_j ⋯ B_1; returns its distance from I and its error to the target.
    """
    saved = layer.skew.detach().clone()
    path = []
    try:
        for j in range(layer.n_factors + 1):
            layer.skew.copy_(saved)
            layer.skew[j:] = 0.0  # Cayley(0) = I
            rotation = layer.rotation()
            eye = torch.eye(rotation.shape[0], device=rotation.device)
            path.append({"kept_factors": j, "distance_from_identity": relative_error(rotation, eye),
                         "error": relative_error(rotation, target)})
    finally:
        layer.skew.copy_(saved)
    return path


def largest_step(path: list[dict]) -> float:
    """The largest jump in distance-from-identity between consecutive points of a path, as a fraction of the whole."""
    distances = [p["distance_from_identity"] for p in path]
    steps = [b - a for a, b in zip(distances, distances[1:])]
    return max(abs(s) for s in steps) / max(distances[-1], 1e-12)


# --- figures ---------------------------------------------------------------------------------------------------------
def plot_expressivity(rows: list[dict], title: str = "") -> Figure:
    """Relative error against free parameters: one curve per block size (m = 1 … dense), OFT points circled."""
    fig = Figure(figsize=(6.5, 4), layout="tight")
    ax = fig.subplots()
    for b in sorted({r["block_size"] for r in rows}):
        curve = sorted((r for r in rows if r["block_size"] == b), key=lambda r: r["n_factors"])
        (line,) = ax.plot([r["n_params"] for r in curve], [r["error"] for r in curve], marker="o", ms=4,
                          label=f"block_size={b}, m=1…{curve[-1]['n_factors']}")
        oft = [r for r in curve if r["n_factors"] == 1]
        ax.scatter([r["n_params"] for r in oft], [r["error"] for r in oft], s=90, facecolors="none",
                   edgecolors=line.get_color(), zorder=3)
    ax.set_xscale("log")
    budgets = [r["n_params"] for r in rows]
    decades = math.log10(max(budgets) / min(budgets))
    # plain labels at 1, 2, 5 × 10^k (1 × 10^k only over a wide range) and none on the minor ticks, which would overlap
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("free parameters m·(d/b)·b(b−1)/2  (circles: OFT, m = 1)")
    ax.set_ylabel("relative error ‖R − T‖ / ‖T‖")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return fig


def plot_factor_paths(paths: dict[str, list[dict]]) -> Figure:
    """Error to the target against distance from I along each ``factor_path`` (one curve per structure)."""
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    for name, path in paths.items():
        ax.plot([p["distance_from_identity"] for p in path], [p["error"] for p in path], marker="o", label=name)
    ax.set_xlabel("distance from identity ‖R_j − I‖ / √d")
    ax.set_ylabel("error to target ‖R_j − T‖ / √d")
    ax.set_title("identity (left) → fitted rotation: one point per kept factor", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def explore_expressivity(dim: int = 32, block_size: int = 4, n_factors: int = 2, steps: int = 150, seed: int = 0) -> Figure | None:
    """Widget body: fit one random rotation with BOFT(m, b), print its error and budget, draw its factor path."""
    generator = torch.Generator().manual_seed(seed)
    target = random_rotation(dim, generator)
    try:
        fit = fit_rotation(target, block_size, n_factors, steps)
    except ValueError as err:
        print(f"not a valid butterfly: {err}")
        return None
    print(f"{fit.name} in d={dim}: {fit.n_params} free parameters (dense orthogonal: {dim * (dim - 1) // 2}), "
          f"relative error {fit.error:.3f} (identity: {relative_error(torch.eye(dim), target):.3f})")
    return plot_factor_paths({fit.name: factor_path(fit.layer, target)})
