"""The primer's experiments: LoRA and OFT on one real weight, the angles between its neurons, the Cayley transform.

A layer's weight W (n × d) holds one weight vector per output neuron (its rows). LoRA adds a low-rank update,
W' = W + (α/r)·B·A; OFT rotates every neuron by the same orthogonal R, W' = W·Rᵀ (row w_i becomes R·w_i), which keeps
every inner product ⟨w_i, w_j⟩ and so every angle between neurons — the OFT paper's argument (Qiu et al., 2023): the
hyperspherical energy Σ_{i≠j} 1/‖ŵ_i − ŵ_j‖ of the normalised neurons ŵ_i, which describes their pairwise
relational structure, is unchanged by OFT and changed by LoRA. The math comes from ``boftlab.butterfly`` (the OFT
layer, ``skew_symmetric``, ``cayley``) and PEFT (the LoRA layer). For notebook 01; tested in
``tests/test_teaching_primer.py``.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure
from torch import nn

from ..butterfly import OFTConfig, cayley, skew_symmetric


# --- angles between neurons ------------------------------------------------------------------------------------------
def neuron_cosines(weight: torch.Tensor) -> torch.Tensor:
    """(n, d) weight -> (n, n) cosines between its rows (one weight vector per output neuron). O(n²·d)."""
    unit = weight.double() / weight.double().norm(dim=1, keepdim=True)
    return unit @ unit.T


def hyperspherical_energy(weight: torch.Tensor) -> float:
    """Σ_{i≠j} 1/‖ŵ_i − ŵ_j‖ over the normalised rows ŵ_i of an (n, d) weight (OFT paper, Eq. 1 with s = 1). O(n²·d)."""
    distance = (2 - 2 * neuron_cosines(weight)).clamp_min(0).sqrt()  # ‖ŵ_i − ŵ_j‖² = 2 − 2·cos
    off_diagonal = ~torch.eye(weight.shape[0], dtype=torch.bool)
    return (1 / distance[off_diagonal]).sum().item()


# --- the two updates on one weight -----------------------------------------------------------------------------------
def oft_weight(weight: torch.Tensor, block_size: int, skew_std: float, generator: torch.Generator) -> torch.Tensor:
    """(n, d) W -> W·Rᵀ for an OFT layer (``boftlab.OFTConfig``) whose skew entries are drawn N(0, skew_std²), as if
    trained. O(n·d·b)."""
    layer = OFTConfig(block_size=block_size, scale=False).make_layer(nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        layer.base_layer.weight.copy_(weight)
        layer.skew.copy_(torch.randn(layer.skew.shape, generator=generator) * skew_std)
        return layer.rotated_weight().detach()


def lora_layer(weight: torch.Tensor, rank: int, alpha: float) -> nn.Module:
    """PEFT's LoRA Linear around a frozen copy of the (n, d) weight: lora_A (r, d) random, lora_B (n, r) zero."""
    import peft

    base = nn.Sequential()
    base.add_module("layer", nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        base.layer.weight.copy_(weight)
    return peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=["layer"]), base).layer


def lora_weight(weight: torch.Tensor, rank: int, update_norm: float, generator: torch.Generator) -> torch.Tensor:
    """(n, d) W -> W + (α/r)·B·A with PEFT's LoRA layer, A and B drawn from ``generator`` (as if trained) and B rescaled
    so that ‖(α/r)·B·A‖_F = ``update_norm`` — an update of the same size as an OFT one, for a fair comparison.
    O(n·d·r)."""
    layer = lora_layer(weight, rank, alpha=rank)
    with torch.no_grad():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        a.copy_(torch.randn(a.shape, generator=generator))
        b.copy_(torch.randn(b.shape, generator=generator))
        b.mul_(update_norm / layer.get_delta_weight("default").norm())
        return weight + layer.get_delta_weight("default")


def plot_cosine_changes(weight: torch.Tensor, adapted: dict[str, torch.Tensor]) -> Figure:
    """One panel per adapted weight: how much the cosine between every pair of neurons changed, against its value
    before (one point per pair; a shared y-axis, so a flat line at 0 means every angle was kept)."""
    before = neuron_cosines(weight)
    pairs = torch.triu_indices(*before.shape, 1)
    fig = Figure(figsize=(4.2 * len(adapted), 3.6), layout="tight")
    axes = fig.subplots(1, len(adapted), squeeze=False, sharey=True)[0]
    for ax, (name, new) in zip(axes, adapted.items()):
        change = neuron_cosines(new) - before
        ax.scatter(before[pairs[0], pairs[1]], change[pairs[0], pairs[1]], s=1, alpha=0.3)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("cos(w_i, w_j) before")
        ax.set_title(f"{name}: max |change| {change.abs().max():.2g}", fontsize=9)
    axes[0].set_ylabel("cos after − cos before")
    return fig


# --- the Cayley transform --------------------------------------------------------------------------------------------
def example_skew(block_size: int, norm: float, seed: int = 0) -> torch.Tensor:
    """A (b, b) skew-symmetric matrix in fp64 with Frobenius norm ``norm``, from ``skew_symmetric`` of seeded
    Gaussian entries."""
    entries = torch.randn(block_size * (block_size - 1) // 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    skew = skew_symmetric(entries, block_size)
    return skew * (norm / skew.norm())


def orthogonality_error(matrix: torch.Tensor) -> float:
    """max |QᵀQ − I|: 0 for an orthogonal matrix (rounding aside)."""
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype)
    return (matrix.transpose(-1, -2) @ matrix - eye).abs().max().item()


def neumann_errors(block_size: int, norms: list[float], terms: list[int]) -> list[dict]:
    """One row per ‖S‖_F: the orthogonality error of the exact Cayley transform and of each truncated Cayley–Neumann
    series (``cayley(S, neumann_terms=n)``), for the ``example_skew`` of that norm."""
    rows = []
    for norm in norms:
        skew = example_skew(block_size, norm)
        row = {"‖S‖_F": norm, "exact": orthogonality_error(cayley(skew))}
        row.update({f"{n} terms": orthogonality_error(cayley(skew, n)) for n in terms})
        rows.append(row)
    return rows


def plot_neumann_errors(rows: list[dict]) -> Figure:
    """Orthogonality error against ‖S‖_F, one line per number of Neumann terms and one for the exact transform."""
    fig = Figure(figsize=(6, 4), layout="tight")
    ax = fig.subplots()
    norms = [r["‖S‖_F"] for r in rows]
    for key in [k for k in rows[0] if k != "‖S‖_F"]:
        ax.loglog(norms, [max(r[key], 1e-17) for r in rows], marker="o", ms=3, label=key)
    ax.set_xlabel("‖S‖_F")
    ax.set_ylabel("max |QᵀQ − I|")
    ax.set_title("Cayley–Neumann series: how far from orthogonal", fontsize=9)
    ax.legend(fontsize=7)
    return fig
