"""Butterfly patterns, reachability and parameter budgets, for notebooks 02 and 03 — the plain functions under their
widgets.

Each function takes plain numbers, returns a matplotlib ``Figure`` (and prints what a widget should print), and is
tested in ``tests/test_teaching_butterfly.py``. The math comes from ``boftlab.butterfly`` and ``boftlab.counts``;
nothing is re-derived here.

The information-transmission view (BOFT paper, Sec. 3): a d × d matrix is a bipartite graph from d input nodes to d
output nodes, with an edge j → i wherever entry (i, j) is non-zero. A product R = B_m ⋯ B_1 is a graph of m + 1
levels; entry (i, j) of R can be non-zero only if a path leads from input j to output i. We get every pattern by
running ``butterfly_apply`` with all-ones blocks: all entries are positive, nothing cancels, so entry (i, j) of the
product counts the paths from j to i exactly.
"""

from __future__ import annotations

import math

import torch
from matplotlib.figure import Figure

from .. import counts
from ..butterfly import resolve_block_size
from ..butterfly_structure import butterfly_apply, gather_schedule, valid_block_sizes, valid_n_factors


# --- patterns and reachability ---------------------------------------------------------------------------------------
def _check(dim: int, block_size: int, n_factors: int) -> None:
    """ValueError (from butterfly.py, listing the valid choices) unless (d, b, m) is a valid butterfly."""
    if n_factors < 1:
        raise ValueError(f"n_factors must be ≥ 1, got {n_factors}")
    resolve_block_size(dim, block_size, None, n_factors, "dim")


def _product(dim: int, block_size: int, n_factors: int, active: list[int]) -> torch.Tensor:
    """Path counts of the product of the factors in ``active`` (others set to I), as a (d, d) integer tensor."""
    n_blocks = dim // block_size
    blocks = torch.eye(block_size, dtype=torch.float64).repeat(n_factors, n_blocks, 1, 1)  # (m, k, b, b)
    blocks[active] = 1.0
    gathers = gather_schedule(dim, block_size, n_factors, transpose=False)
    # rows of I times R give R itself; R = B_m ⋯ B_1 so entry (i, j) is the flow from input j to output i
    return butterfly_apply(torch.eye(dim, dtype=torch.float64), blocks, gathers).round().long()


def factor_patterns(dim: int, block_size: int, n_factors: int) -> torch.Tensor:
    """(m, d, d) bool: the non-zero pattern of each factor B_1 … B_m. O(m·d²·b)."""
    _check(dim, block_size, n_factors)
    return torch.stack([_product(dim, block_size, n_factors, [i]) != 0 for i in range(n_factors)])


def path_counts(dim: int, block_size: int, n_factors: int) -> torch.Tensor:
    """(m, d, d) int: entry [j, out, in] = number of paths from input ``in`` to output ``out`` through B_1 … B_{j+1}.

    Its support is the sparsity pattern of B_{j+1} ⋯ B_1 for any choice of non-zero blocks. O(m²·d²·b).
    """
    _check(dim, block_size, n_factors)
    return torch.stack([_product(dim, block_size, n_factors, list(range(j + 1))) for j in range(n_factors)])


def reachability(dim: int, block_size: int, n_factors: int) -> torch.Tensor:
    """(d, d) bool: whether information from input j can reach output i through all m factors. O(m·d²·b)."""
    _check(dim, block_size, n_factors)
    return _product(dim, block_size, n_factors, list(range(n_factors))) != 0


def factors_for_dense(dim: int, block_size: int) -> int:
    """log2(d/b) + 1: the fewest butterfly factors whose product is dense; ValueError if d/b is not a power of 2."""
    if block_size < 2 or dim % block_size:
        raise ValueError(f"block_size={block_size} must be ≥ 2 and divide dim={dim}; valid: {valid_block_sizes(dim, 1)}")
    ratio = dim // block_size
    if ratio & (ratio - 1):
        raise ValueError(
            f"dim/block_size = {ratio} is not a power of two, so no butterfly with block_size={block_size} is dense "
            f"in dim={dim}; block sizes that can be: {[b for b in valid_block_sizes(dim, 1) if (dim // b) & (dim // b - 1) == 0]}"
        )
    return int(math.log2(ratio)) + 1


def density(pattern: torch.Tensor) -> float:
    """Fraction of non-zero entries of a (…, d, d) pattern."""
    return pattern.float().mean().item()


# --- figures ---------------------------------------------------------------------------------------------------------
def plot_butterfly_graph(dim: int, block_size: int, n_factors: int, source: int = 0) -> Figure:
    """The m + 1 level graph of R = B_m ⋯ B_1: level 0 are the inputs, level i the outputs of B_i.

    Edges leaving nodes that ``source`` has reached are drawn in colour, so the picture shows how far one input's
    information has spread after each factor.
    """
    patterns = factor_patterns(dim, block_size, n_factors)
    if not 0 <= source < dim:
        raise ValueError(f"source must be an input index in [0, {dim - 1}], got {source}")
    fig = Figure(figsize=(1.6 + 1.4 * n_factors, 0.8 + 0.28 * dim), layout="tight")
    ax = fig.subplots()
    reached = torch.zeros(dim, dtype=torch.bool)
    reached[source] = True
    for level in range(n_factors):
        outs, ins = torch.nonzero(patterns[level], as_tuple=True)
        for i, j in zip(outs.tolist(), ins.tolist()):
            hot = bool(reached[j])
            ax.plot([level, level + 1], [j, i], color="tab:red" if hot else "0.8", lw=1.6 if hot else 0.7,
                    zorder=2 if hot else 1)
        reached = patterns[level].to(torch.long) @ reached.to(torch.long) > 0  # nodes reached after B_{level+1}
    for level in range(n_factors + 1):
        ax.scatter([level] * dim, range(dim), s=18, color="k", zorder=3)
    ax.set_xticks(range(n_factors + 1), ["input"] + [f"B{i + 1}" for i in range(n_factors)])
    ax.set_yticks(range(dim))
    ax.invert_yaxis()
    ax.set_ylabel("coordinate")
    ax.set_title(f"d={dim}, block_size={block_size}, n_factors={n_factors}: input {source} reaches "
                 f"{int(reached.sum())}/{dim} outputs", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def plot_factor_patterns(dim: int, block_size: int, n_factors: int) -> Figure:
    """Two rows of m panels: the pattern of each factor B_i, and of the partial product B_i ⋯ B_1 (with density)."""
    patterns = factor_patterns(dim, block_size, n_factors)
    products = path_counts(dim, block_size, n_factors) != 0
    fig = Figure(figsize=(2.3 * n_factors, 4.8), layout="tight")
    axes = fig.subplots(2, n_factors, squeeze=False)
    for i in range(n_factors):
        axes[0, i].imshow(patterns[i].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        axes[0, i].set_title(f"B{i + 1}", fontsize=9)
        axes[1, i].imshow(products[i].numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        name = "B1" if i == 0 else f"B{i + 1}⋯B1"
        axes[1, i].set_title(f"{name}: {density(products[i]):.0%} dense", fontsize=9)
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("factor")
    axes[1, 0].set_ylabel("product")
    return fig


def plot_reachability(dim: int, block_sizes: list[int] | None = None) -> Figure:
    """Density of B_m ⋯ B_1 against m, one curve per block size; a dashed line marks OFT's density b/d."""
    if block_sizes is None:
        block_sizes = [b for b in valid_block_sizes(dim, 1) if b < dim and (dim // b) & (dim // b - 1) == 0][:4]
    fig = Figure(figsize=(5.5, 3.5), layout="tight")
    ax = fig.subplots()
    for b in block_sizes:
        m_max = max(valid_n_factors(dim, b))
        curve = [density(p != 0) for p in path_counts(dim, b, m_max)]
        (line,) = ax.plot(range(1, m_max + 1), curve, marker="o", label=f"block_size={b}")
        ax.axhline(b / dim, color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlabel("n_factors (m)")
    ax.set_ylabel("fraction of (input, output) pairs connected")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"d={dim}: reachability after m butterfly factors (dotted: OFT, m=1)", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def explore_butterfly(dim: int = 16, block_size: int = 2, n_factors: int = 4) -> Figure | None:
    """Widget body: the factor patterns for (d, b, m), with the parameter counts and density printed.

    An invalid combination is reported as text (the ValueError's message, with the valid choices) instead of a
    traceback, since a slider can land on one; call ``plot_factor_patterns`` directly to get the exception.
    """
    try:
        fig = plot_factor_patterns(dim, block_size, n_factors)
    except ValueError as err:
        print(f"not a valid butterfly: {err}")
        return None
    n_blocks = dim // block_size
    effective = counts.boft_params(dim, dim, block_size, n_factors, scale=False)
    stored = counts.boft_params(dim, dim, block_size, n_factors, scale=False, convention="peft")
    dense = counts.orthogonal_group_dim(dim)
    reach = density(reachability(dim, block_size, n_factors))
    print(f"d={dim}, block_size b={block_size}, n_blocks k={n_blocks}, n_factors m={n_factors}")
    print(f"free parameters m·k·b(b−1)/2 = {effective}  (PEFT stores m·k·b² = {stored}; "
          f"a dense orthogonal matrix has d(d−1)/2 = {dense})")
    print(f"density of R = B_m⋯B_1: {reach:.1%}" + ("  — dense" if reach == 1.0 else ""))
    return fig


# --- parameter counts (notebook 03) ----------------------------------------------------------------------------------
def plot_parameter_budget(
    model: str = "deberta-v3-base",
    method: str = "boft",
    targets: str = "all linear",
    rank: int = 8,
    block_size: int = 8,
    n_factors: int = 2,
    convention: str = "effective",
    scale: bool = True,
) -> Figure | None:
    """Widget body: trainable parameters of ``method`` on a meta-device ``model``, split by layer name; prints the total.

    Invalid hyper-parameters for some layer (e.g. a block size that does not divide its fan-in) are reported as
    text with the valid choices.
    """
    hyper = {"rank": rank} if method == "lora" else {"block_size": block_size, "scale": scale, "convention": convention}
    if method == "boft":
        hyper["n_factors"] = n_factors
    try:
        split = counts.count_by_suffix(model, method, targets, **hyper)
    except ValueError as err:
        print(f"not valid for {model}: {err}")
        return None
    total = sum(split.values())
    base = counts.n_base_params(model)
    print(f"{method} on {model} ({targets}): {total:,} trainable parameters = {total / 1e6:.2f}M "
          f"= {100 * total / base:.3f}% of {base / 1e6:.1f}M")
    fig = Figure(figsize=(6.5, 0.6 + 0.35 * len(split)), layout="tight")
    ax = fig.subplots()
    names = list(split)
    ax.barh(names, [split[n] / 1e6 for n in names], color="tab:blue")
    ax.invert_yaxis()
    ax.set_xlabel("trainable parameters (M), summed over blocks")
    ax.set_title(f"{model}, {budget_setting(method, rank, block_size, n_factors, convention, scale)}\non {targets}: "
                 f"{total:,} trainable", fontsize=9)
    return fig


def budget_setting(method: str, rank: int, block_size: int, n_factors: int, convention: str, scale: bool) -> str:
    """A method's hyper-parameters as a reader writes them: "LoRA r = 8", "BOFT b = 8, m = 2, with scale (effective
    count)"."""
    if method == "lora":
        return f"LoRA r = {rank}"
    factors = f", m = {n_factors}" if method == "boft" else ""
    return (f"{method.upper()} b = {block_size}{factors}, {'with' if scale else 'no'} scale "
            f"({convention} count)")
