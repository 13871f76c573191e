"""Butterfly-orthogonal fine-tuning: BOFT (Liu et al., ICLR 2024) and OFT, its one-factor special case.

The adapted layer keeps its frozen weight W (out × d, PyTorch layout) and learns an orthogonal R (d × d) and an
output scale s:

    W' = diag(s) · W · Rᵀ,        R = B_m ⋯ B_1,        B_i = P_i · blockdiag(Q_i1 … Q_ik) · P_iᵀ

* each Q_ij is a b × b orthogonal block, the Cayley transform Q = (I − S)(I + S)⁻¹ of a skew-symmetric S stored as
  its b(b−1)/2 upper-triangular entries (exactly, by a solve, or by the Cayley–Neumann series);
* P_i is the i-th butterfly permutation: P_1 = I; P_i splits every chunk of b·2^(i−1) coordinates into halves of
  b/2 and interleaves them, like a Cooley–Tukey stage, so after log2(d/b)+1 factors every input reaches every output.
  The permutations and the block layout are the paper's (and PEFT's), so a PEFT BOFT adapter maps 1:1 onto ours.

Nothing here builds the dense d × d matrix while training. R has two exact forms (``butterfly_structure``):

* factored:  the m factors applied to each row, O(d·b·m) per row (``butterfly_apply_reshaped``; on CUDA the fused
  kernel of ``kernels/``);
* assembled: every factor mixes only within chunks of L = b·2^(m−1) coordinates, so R is block diagonal with L × L
  blocks. Its w × w diagonal blocks (w a multiple of L, at least ``MIN_WIDTH``) are assembled once per call — one
  gather of every factor's blocks and m − 1 batched w × w products, O(d·w²·(m − 1)) — and then rows @ R is one
  block-diagonal product, O(d·w) per row: OFT's cost at block size w.

and the layer picks, per call, the cheapest of three exact paths (``path_costs``):

* "input":     y = s ⊙ (W · (Rᵀx)) + bias      — rotate the activations by the factored form, then the frozen layer;
* "assembled": the same, rotating the activations by the assembled form (the default choice while L is small);
* "weight":    y = (diag(s) · W · Rᵀ) x + bias  — rotate W's rows once (by the cheaper form), then one matmul / conv.
  ``merge`` writes this same weight.

Base layers (read through ``boftlab.base_layers``). nn.Linear and transformers' Conv1D (GPT-2, W stored transposed)
have all three paths. A bitsandbytes quantized Linear has only the two activation paths ("input", "assembled"), run
by its own kernel, W never dequantized:

    y = h + (s − 1) ⊙ (h − bias),   h = base(Rᵀx)   (= s ⊙ (W Rᵀx) + bias; without a scale, y = h)

written so that s = 1 adds exactly nothing: bit-equal to the base layer at init. An nn.Embedding rotates its outputs,
as PEFT's OFT does: each looked-up row e becomes e · R · diag(s), so the merged table is W' = W · R · diag(s); the
padding_idx row stays the base's (PEFT rotates it too, which changes nothing while it is zero, as nn.Embedding
initialises it). An Embedding with max_norm is refused: it renormalises looked-up rows in place, and a scale changes
the norms, so the adapted and merged forms would renormalise different rows.

The file reads in that order: the orthogonal blocks (skew entries, Cayley, their inverse), ``ButterflyRotation`` —
R as a module of its own: parametrisation, products, costs —, the configs, and ``BOFTLayer``, which composes its
rotation with the base layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from . import base_layers
from .base_layers import Conv1D
from .butterfly_structure import (
    assemble_diagonal_blocks,
    assembled_width,
    assembly_index,
    block_diagonal_apply,
    butterfly_apply_reshaped,
    diagonal_blocks,
    valid_block_sizes,
    valid_n_factors,
)
from .contract import (
    AdapterConfig, AdapterLayer, autocast_off, check_integer, check_number, merge_dtype, nearest,
)
from .kernels import KERNELS, butterfly_apply_fused, fused_available, fused_supported, kernel_in_force

#: Per row element, in multiply-adds of a dense fp32 matmul: one factor of the PyTorch factored form (its batched
#: b × b products and the reshape copies around them; at least b) and one block-diagonal product of the assembled
#: form (at least its width w). Calibrated with ``python -m boftlab.bench butterfly_costs`` (the measurement behind
#: these values: benchmarks/README.md); the auto path choice uses them, results never depend on them.
FACTOR_COST = 350
PRODUCT_COST = 100
#: Up to this width w the assembled form's diagonal blocks are gathered from the blocks (an (m, w, w) index per layer,
#: and m − 1 products of w × w blocks, O(d·w²·(m − 1))); wider ones come from the tiled identity, O(w·d·b·m).
MAX_GATHER_WIDTH = 64
#: Assembled diagonal blocks are at least this wide: batched products of narrower blocks run several times slower per
#: element on CPU (``butterfly_costs``), and GPU matrix-multiply tiles are 16 wide.
MIN_WIDTH = 16


# --- fitting the structure to a layer -------------------------------------------------------------------------------
def resolve_block_size(dim: int, block_size: int | None, n_blocks: int | None, n_factors: int, what: str) -> int:
    """The block size for a d-dimensional fan-in, or a ValueError that lists what would be valid."""
    if n_blocks is not None:
        if n_blocks < 1 or dim % n_blocks:
            divisors = [n for n in range(1, dim // 2 + 1) if dim % n == 0 and dim // n >= 2]
            raise ValueError(
                f"n_blocks={n_blocks} does not divide {what}={dim}; valid n_blocks for this layer: {divisors}"
            )
        block_size = dim // n_blocks
    assert block_size is not None
    valid = valid_block_sizes(dim, n_factors)
    if block_size not in valid:
        factors = valid_n_factors(dim, block_size) if block_size >= 2 else []
        hint = f"nearest valid block_size: {nearest(block_size, valid)}" if valid else "use fewer n_factors"
        raise ValueError(
            f"block_size={block_size} with n_factors={n_factors} does not fit {what}={dim}: block_size·2^(n_factors−1) "
            f"must divide {dim}" + (" and block_size must be even" if n_factors > 1 else "")
            + f". Valid block_size for n_factors={n_factors}: {valid}; valid n_factors for block_size={block_size}: "
            f"{factors}; {hint}."
        )
    return block_size


# --- orthogonal blocks -----------------------------------------------------------------------------------------------
def upper_index(block_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(b, b) int64: 1 + j at the j-th strictly upper entry (row-major order), 0 elsewhere — where ``skew_symmetric``
    reads each entry of U from its entries with a zero put in front. O(b²)."""
    rows, cols = torch.triu_indices(block_size, block_size, 1, device=device)
    index = torch.zeros(block_size, block_size, dtype=torch.long, device=device)
    index[rows, cols] = torch.arange(1, len(rows) + 1, device=device)
    return index


def skew_symmetric(vec: torch.Tensor, block_size: int, index: torch.Tensor | None = None) -> torch.Tensor:
    """(..., b(b−1)/2) -> (..., b, b): S = U − Uᵀ with U strictly upper triangular (row-major order), exactly
    skew-symmetric. ``index``: ``upper_index(b)``, if the caller keeps it (one gather, no index built per call)."""
    index = upper_index(block_size, vec.device) if index is None else index
    padded = torch.nn.functional.pad(vec, (1, 0))  # (..., 1 + b(b−1)/2): entry 0 is the zero put in front
    upper = padded.index_select(-1, index.reshape(-1)).reshape(*vec.shape[:-1], block_size, block_size)
    return upper - upper.transpose(-1, -2)


def skew_entries(skew: torch.Tensor) -> torch.Tensor:
    """(..., b, b) -> (..., b(b−1)/2): the inverse of ``skew_symmetric`` for an exactly skew-symmetric input."""
    b = skew.shape[-1]
    rows, cols = torch.triu_indices(b, b, 1, device=skew.device)
    return skew[..., rows, cols]


def cayley(skew: torch.Tensor, neumann_terms: int | None = None) -> torch.Tensor:
    """(..., b, b) skew-symmetric S -> orthogonal Q = (I − S)(I + S)⁻¹. O(b³) per block. S must be exactly
    skew-symmetric (``skew_symmetric`` makes it so): I − S is read as (I + S)ᵀ.

    With ``neumann_terms = n`` the inverse is the truncated series (I + S)⁻¹ ≈ Σ_{j<n−1} (−S)^j, i.e.
    Q ≈ I − 2S + 2S² − … ± S^{n−1}: n terms, only matmuls, orthogonal up to O(‖S‖ⁿ).
    """
    eye = torch.eye(skew.shape[-1], device=skew.device, dtype=skew.dtype)
    if neumann_terms is None:
        plus = eye + skew  # I + S, whose transpose is I − S: exactly, S being exactly skew-symmetric
        return torch.linalg.solve(plus, plus.transpose(-1, -2), left=False)  # X (I + S) = I − S
    eye = eye.expand_as(skew)
    series, power = eye.clone(), eye
    for _ in range(neumann_terms - 2):
        power = -power @ skew
        series = series + power
    return (eye - skew) @ series


# --- undoing a merge: R⁻ᵀ from the same blocks ------------------------------------------------------------------------
def inverse_transposed_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """(m, k, b, b) blocks Q -> Q⁻ᵀ, or a ValueError naming a singular block. O(m·k·b³).

    With Q⁻ᵀ in place of Q, the product ``ButterflyRotation.rotate`` forms as x @ R becomes x @ R⁻ᵀ: B_i⁻ᵀ = P_i ·
    blockdiag(Q_i⁻ᵀ) · P_iᵀ and R⁻ᵀ = (B_1ᵀ ⋯ B_mᵀ)⁻¹ = B_m⁻ᵀ ⋯ B_1⁻ᵀ, the factors in R's own order. An exactly
    orthogonal Q has Q⁻ᵀ = Q; the truncated Cayley–Neumann series is not orthogonal, so there Rᵀ is not R⁻¹.
    """
    inverse, info = torch.linalg.inv_ex(blocks.transpose(-1, -2))
    bad = (info != 0) | ~torch.isfinite(inverse).all(dim=(-1, -2))
    if bad.any():
        factor, block = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"block {block} of factor {factor} is singular ({int(bad.sum())} such block(s)), so W' = diag(s)·W·Rᵀ "
            "could not be undone; keep this adapter unmerged (its forward is exact) or use neumann_terms=None "
            "(the exact Cayley transform is always invertible)"
        )
    return inverse


# --- the rotation as a module ----------------------------------------------------------------------------------------
class ButterflyRotation(nn.Module):
    """R = B_m ⋯ B_1 on a d-dimensional axis, as a function of the skew entries: the rotation of one BOFT/OFT layer.

    Everything about R lives here: the parametrisation (skew entries -> b × b skew matrices -> Cayley blocks, COFT,
    multiplicative dropout), products with R or Rᵀ in its factored or assembled form, their costs, and the dense R
    for teaching. It holds no parameter: the layer owns ``skew`` (m, k, b(b−1)/2) — the name its saved files use —
    and calls ``butterfly(skew)`` for the blocks, as a torch parametrization maps its tensor. Its two index buffers
    (where ``skew_symmetric`` and the assembly gather from) are derived from the shape and never saved.
    """

    def __init__(self, dim: int, block_size: int, n_factors: int, neumann_terms: int | None = None,
                 coft_radius: float | None = None, dropout: float = 0.0, kernel: str = "auto",
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.dim, self.block_size, self.n_factors = dim, block_size, n_factors
        self.n_blocks = dim // block_size  # k
        self.n_entries = block_size * (block_size - 1) // 2  # free entries of one skew-symmetric block
        self.width = assembled_width(dim, block_size, n_factors, MIN_WIDTH)  # w of the assembled form
        self.neumann_terms = neumann_terms  # None: the exact Cayley transform
        self.coft_radius = coft_radius  # None: no COFT constraint; else ‖S‖_F ≤ coft_radius per block
        self.dropout = dropout
        self.kernel = kernel  # "auto" or "torch" (``boftlab.kernels``)
        self.gathers = self.width <= MAX_GATHER_WIDTH  # assemble R's w × w blocks by one gather (else: tiled identity)
        # index tensors, derived from the shape: buffers that move with the layer, never saved (persistent=False)
        self.register_buffer("upper_index", None, persistent=False)  # (b, b), skew_symmetric's
        self.register_buffer("assembly_index", None, persistent=False)  # (m, w, w), assemble_diagonal_blocks'
        self._build_indices(torch.device("cpu") if device is None else device)

    def _build_indices(self, device: torch.device) -> None:
        self.upper_index = upper_index(self.block_size, device)
        if self.gathers:
            self.assembly_index = assembly_index(self.block_size, self.n_factors, self.width).to(device)

    def _apply(self, fn: Any, recurse: bool = True) -> "ButterflyRotation":
        """``nn.Module._apply`` (``.to``, ``to_empty``, …), then the index buffers rebuilt where they now are: they
        are derived from the shape, and ``to_empty`` would leave them uninitialised (state_dict does not hold them)."""
        super()._apply(fn, recurse)
        if not self.upper_index.is_meta:
            self._build_indices(self.upper_index.device)
        return self

    def _indices_on(self, device: torch.device) -> None:
        """Rebuild the index buffers on ``device`` where they are elsewhere: a layer moved to the meta device and given
        its values by ``load_state_dict(state, assign=True)``, which never sees non-persistent buffers."""
        if self.upper_index.device != device:
            self._build_indices(device)

    # --- the parametrisation ---
    def forward(self, skew: torch.Tensor) -> torch.Tensor:
        """skew (m, k, b(b−1)/2) -> (m, k, b, b) orthogonal blocks in fp32 (or fp64), COFT and (while training)
        multiplicative dropout applied. O(m·k·b³)."""
        blocks = self.cayley_blocks(skew)
        if self.training and self.dropout > 0:
            drop = torch.rand(blocks.shape[:2], device=blocks.device) < self.dropout  # (m, k)
            blocks = torch.where(drop[..., None, None], torch.eye(self.block_size, device=blocks.device), blocks)
        return blocks

    def cayley_blocks(self, skew: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(m, k, b, b) blocks computed in ``dtype`` (default fp32, or fp64 for fp64 entries; merges pass fp64) with
        COFT applied and no dropout: the eval-mode R, which merge folds in whatever the mode (dropout perturbs
        training steps only)."""
        dtype = dtype or torch.promote_types(skew.dtype, torch.float32)
        with autocast_off(skew.device):  # Cayley (solve or series) in fp32 under AMP
            self._indices_on(skew.device)
            matrices = skew_symmetric(skew.to(dtype), self.block_size, self.upper_index)
            if self.coft_radius is not None:
                # constrained OFT: pull each block's S back onto the ball ‖S‖_F ≤ eps/√k (eps as in PEFT)
                norm = torch.linalg.matrix_norm(matrices, keepdim=True)
                matrices = matrices * torch.clamp(self.coft_radius / norm.clamp_min(1e-30), max=1.0)
            return cayley(matrices, self.neumann_terms)

    # --- products with R ---
    def rotate(self, rows: torch.Tensor, blocks: torch.Tensor, transpose: bool = False,
               form: str | None = None) -> torch.Tensor:
        """rows: (..., d) -> rows @ R (or rows @ Rᵀ); R is never formed. ``blocks``: (m, k, b, b), any (unmerge
        passes inverses).

        form "factored": the m factors, O(d·b·m) per row — the fused kernel where it runs (``kernel="auto"``, CUDA,
        Triton, a supported shape; same result to fp tolerance), ``butterfly_apply_reshaped`` elsewhere;
        "assembled": R's w × w diagonal blocks, assembled once in the blocks' precision (``diagonal_blocks``), then
        one block-diagonal product, O(d·w) per row; None: the cheaper of the two for this many rows (``costs``).
        """
        if form is None:
            costs = self.costs(rows.numel() // self.dim, rows.dtype, rows.device)
            form = min(costs, key=costs.get)
        if form == "assembled":
            return block_diagonal_apply(rows, self.diagonal_blocks(blocks, transpose).to(rows.dtype))
        blocks = blocks.to(rows.dtype)
        if self.kernel == "auto" and fused_supported(rows, blocks):
            return butterfly_apply_fused(rows, blocks, transpose)
        return butterfly_apply_reshaped(rows, blocks, transpose)

    def diagonal_blocks(self, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """blocks (m, k, b, b) -> R's (or Rᵀ's) w × w diagonal blocks, (d/w, w, w): by one gather and m − 1 batched
        products while w ≤ ``MAX_GATHER_WIDTH`` (``assemble_diagonal_blocks``, O(d·w²·(m − 1))), else from the tiled
        identity (``diagonal_blocks``, O(w·d·b·m)); the same matrices either way."""
        if self.gathers:
            self._indices_on(blocks.device)
            diagonal = assemble_diagonal_blocks(blocks, self.assembly_index)
            return diagonal.transpose(-1, -2) if transpose else diagonal
        return diagonal_blocks(blocks, self.width, transpose)

    def dense(self, blocks: torch.Tensor) -> torch.Tensor:
        """The d × d matrix R of ``blocks`` — for tests, figures and teaching only. O(d²·w)."""
        return self.rotate(torch.eye(self.dim, device=blocks.device, dtype=blocks.dtype), blocks)

    def costs(self, n_rows: int, dtype: torch.dtype, device: torch.device) -> dict[str, int]:
        """Multiply-adds of multiplying ``n_rows`` rows by R, per form (forward only).

        Per row element the factored form costs m·max(b, ``FACTOR_COST``) with PyTorch and its m·b multiply-adds in
        the fused kernel (all on chip, one pass over the rows); the assembled form costs max(w, ``PRODUCT_COST``) per
        row element plus its assembly: gathered (w ≤ ``MAX_GATHER_WIDTH``), one copy per element of the m factors'
        diagonal blocks and m − 1 block-diagonal products on w rows; else the factored PyTorch form on w rows.
        """
        d, m, b, w = self.dim, self.n_factors, self.block_size, self.width
        torch_factored, product = m * max(b, FACTOR_COST), max(w, PRODUCT_COST)
        fused = self.kernel == "auto" and fused_available(device, d, b, m, dtype)
        assembly = m * d * w + (m - 1) * w * d * product if self.gathers else w * d * torch_factored
        return {"factored": n_rows * d * (m * b if fused else torch_factored),
                "assembled": assembly + n_rows * d * product}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block_size={self.block_size}, n_factors={self.n_factors}, width={self.width}"


# --- config ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BOFTConfig(AdapterConfig):
    """Butterfly orthogonal fine-tuning.

    block_size (b) or n_blocks (k = d/b): size of the orthogonal blocks; give one of them (default b = 8).
    n_factors (m): butterfly factors; m = 1 is OFT, m = log2(d/b)+1 makes R dense.
    scale: learn the output scale s (BOFT/PEFT do). dropout: multiplicative dropout — each block of each factor
    is replaced by the identity with this probability while training (paper, Sec. 5).
    coft, coft_eps: constrained OFT — every block's skew matrix is kept in the ball ‖S‖_F ≤ coft_eps/√k.
    neumann_terms: None for the exact Cayley transform, n ≥ 2 for the n-term Cayley–Neumann series.
    path: "auto" picks the cheapest exact path per call; "input" (factored R on the activations), "assembled" (R's
    diagonal blocks on the activations) or "weight" (rotated weight) forces one (tests, benchmarks).
    kernel: "auto" rotates with the fused Triton kernel where it runs (CUDA, Triton, a supported b, m and dtype; the
    same result to fp tolerance) and with PyTorch elsewhere; "torch" always with PyTorch. The environment variable
    BOFTLAB_KERNEL=torch forces "torch" on every layer built while it is set (``boftlab.kernels``).
    """

    family: ClassVar[str] = "boft"
    #: values each option takes in seeded random tests (tests/test_round_trips.py; a value listed twice is drawn twice
    #: as often, and one that the config or the layer refuses leaves the option at its default)
    option_space: ClassVar[dict[str, tuple]] = dict(
        block_size=(2, 4, 8), n_factors=(1, 2, 3, 4), scale=(True, True, False), coft=(False, False, False, True),
        neumann_terms=(None, None, 2, 3, 4, 5), dropout=(0.0, 0.0, 0.3))
    examples: ClassVar[tuple[dict, ...]] = (dict(block_size=4, n_factors=2),)

    block_size: int | None = None
    n_blocks: int | None = None
    n_factors: int = 2
    scale: bool = True
    dropout: float = 0.0
    coft: bool = False
    coft_eps: float = 6e-5
    neumann_terms: int | None = None
    path: str = "auto"
    kernel: str = "auto"

    def __post_init__(self) -> None:
        for name in ("block_size", "n_blocks", "n_factors", "neumann_terms"):
            if getattr(self, name) is not None:
                setattr(self, name, check_integer(name, getattr(self, name)))
        for name in ("dropout", "coft_eps"):
            setattr(self, name, check_number(name, getattr(self, name)))
        for name in ("scale", "coft"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.block_size is not None and self.n_blocks is not None:
            raise ValueError(
                f"give block_size or n_blocks, not both (got block_size={self.block_size}, n_blocks={self.n_blocks});"
                " block_size × n_blocks must equal the layer's fan-in, so one determines the other."
            )
        if self.block_size is None and self.n_blocks is None:
            self.block_size = 8
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"block_size must be ≥ 2 (a 1×1 orthogonal block is ±1), got {self.block_size}")
        if self.n_blocks is not None and self.n_blocks < 1:
            raise ValueError(f"n_blocks must be ≥ 1, got {self.n_blocks}")
        if not isinstance(self.n_factors, int) or self.n_factors < 1:
            raise ValueError(f"n_factors must be an integer ≥ 1 (1 is OFT), got {self.n_factors!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout is a probability in [0, 1), got {self.dropout}")
        if self.neumann_terms is not None and self.neumann_terms < 2:
            raise ValueError(f"neumann_terms must be None (exact Cayley) or ≥ 2, got {self.neumann_terms}")
        if self.coft_eps <= 0:
            raise ValueError(f"coft_eps must be > 0, got {self.coft_eps}")
        self.check_path()
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")

    def supported_layers(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear, Conv1D, nn.Conv2d, nn.Embedding)

    def layer_class(self) -> type["BOFTLayer"]:
        return BOFTLayer


@dataclasses.dataclass
class OFTConfig(BOFTConfig):
    """Orthogonal fine-tuning (Qiu et al., 2023): BOFT with one factor, no output scale by default."""

    family: ClassVar[str] = "oft"
    option_space: ClassVar[dict[str, tuple]] = dict(  # as BOFT's, with one factor
        block_size=(2, 4, 8, 16), scale=(True, False, False), coft=(False, False, False, True),
        neumann_terms=(None, None, 2, 3, 4, 5), dropout=(0.0, 0.0, 0.3))
    examples: ClassVar[tuple[dict, ...]] = (dict(block_size=4),)

    n_factors: int = 1
    scale: bool = False

    def __post_init__(self) -> None:
        if self.n_factors != 1:
            raise ValueError(f"OFT has exactly one factor (got n_factors={self.n_factors}); use BOFTConfig for more")
        super().__post_init__()


# --- the layer -------------------------------------------------------------------------------------------------------
class BOFTLayer(AdapterLayer):
    """A frozen linear layer (nn.Linear, Conv1D, quantized) or nn.Conv2d with W' = diag(s) · W · Rᵀ (conv: W flattened
    to out × (c/groups·kh·kw)), or an nn.Embedding whose output rows e become e · R · diag(s).

    The layer composes its ``butterfly`` (a ``ButterflyRotation``: R from ``skew``) with the base layer, read through
    ``base_layers``: which rows R rotates (a linear/conv layer's inputs, an Embedding's looked-up outputs) and how the
    base's product continues from them."""

    def __init__(self, base_layer: nn.Module, config: BOFTConfig) -> None:
        super().__init__(base_layer, config)
        self.rotates_outputs = base_layers.rotates_outputs(base_layer)  # an Embedding: e -> e · R · diag(s)
        if self.rotates_outputs and base_layers.renormalises_in_place(base_layer):
            raise ValueError(
                f"BOFT/OFT cannot adapt an Embedding with max_norm={base_layer.max_norm}: it renormalises every "
                "looked-up row in place, and the output scale changes row norms, so the adapted and the merged "
                "tables would renormalise different rows. Use an Embedding with max_norm=None, or "
                "TensorCoreConfig, which renormalises the rows of W + ΔW exactly."
            )
        self.fan_in, what = base_layers.rotated_axis(base_layer)  # d
        # the scale's length: W's rows (outputs), or an Embedding's d (its rows e · R · diag(s) are scaled per column)
        self.out_features = self.fan_in if self.rotates_outputs else base_layers.weight_shape(base_layer)[0]
        block_size = resolve_block_size(self.fan_in, config.block_size, config.n_blocks, config.n_factors, what)
        self.block_size, self.n_blocks, self.n_factors = block_size, self.fan_in // block_size, config.n_factors
        coft_radius = config.coft_eps / math.sqrt(self.n_blocks) if config.coft else None
        self.butterfly = ButterflyRotation(self.fan_in, block_size, self.n_factors, config.neumann_terms, coft_radius,
                                           config.dropout, kernel_in_force(config.kernel), base_layer.weight.device)
        unfold_padding = (
            "needs a Conv2d with padding_mode='zeros' and numeric padding (F.unfold pads with zeros only); "
            f"got padding={getattr(base_layer, 'padding', None)!r}, "
            f"padding_mode={getattr(base_layer, 'padding_mode', None)!r}"
        )
        self.check_forced_path({
            "input": unfold_padding,
            "assembled": unfold_padding,
            "weight": "needs the base weight, which this quantized layer stores packed (bitsandbytes)",
        })

        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        # zero skew-symmetric part -> every Q is I -> R = I: the adapted layer equals the base layer at step 0.
        self.skew = nn.Parameter(torch.zeros(self.n_factors, self.n_blocks, self.butterfly.n_entries, **factory))
        self.scale = nn.Parameter(torch.ones(self.out_features, **factory)) if config.scale else None

    @property
    def kernel(self) -> str:
        """"auto" or "torch": how this layer's rotations run (``boftlab.kernels``)."""
        return self.butterfly.kernel

    # --- the rotation (``ButterflyRotation``) of this layer's skew entries ---
    def orthogonal_blocks(self) -> torch.Tensor:
        """(m, k, b, b) orthogonal blocks in fp32 (or fp64), COFT and (while training) multiplicative dropout
        applied."""
        return self.butterfly(self.skew)

    def cayley_blocks(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The eval-mode blocks (no dropout) in ``dtype`` (``ButterflyRotation.cayley_blocks``)."""
        return self.butterfly.cayley_blocks(self.skew, dtype)

    def rotate(self, rows: torch.Tensor, transpose: bool = False, blocks: torch.Tensor | None = None,
               form: str | None = None) -> torch.Tensor:
        """rows: (..., d) -> rows @ R (or rows @ Rᵀ) by ``blocks`` (default: this layer's orthogonal blocks) in
        ``form`` ("factored", "assembled", None: the cheaper; ``ButterflyRotation.rotate``)."""
        return self.butterfly.rotate(rows, self.orthogonal_blocks() if blocks is None else blocks, transpose, form)

    def rotation(self) -> torch.Tensor:
        """The dense d × d matrix R — for tests, figures and teaching only."""
        return self.butterfly.dense(self.orthogonal_blocks())

    def rotation_costs(self, n_rows: int, dtype: torch.dtype) -> dict[str, int]:
        """Multiply-adds of multiplying ``n_rows`` rows by R, per form (``ButterflyRotation.costs``)."""
        return self.butterfly.costs(n_rows, dtype, self.skew.device)

    # --- choosing a path ---
    def paths(self) -> tuple[str, ...]:
        """All three paths, except for a conv whose padding ``F.unfold`` cannot reproduce ("same", or not zeros) and
        for a quantized layer (its weight is packed: only the activation paths, through its own kernel)."""
        if not base_layers.unfolds_exactly(self.base_layer):
            return ("weight",)
        return ("input", "assembled") if self.quantized_base else ("input", "assembled", "weight")

    def path_costs(self, x_shape: Sequence[int], training: bool, input_requires_grad: bool) -> dict[str, int]:
        """Multiply-adds of one call on an input of ``x_shape``, per path.

        n rows (tokens, conv output positions, or looked-up ids: ``base_layers.vectors``) of fan-in d, out outputs;
        C₀ = n·out·d, the base product (``base_layers.base_cost``; 0 for an Embedding, which only looks rows up);
        rot(r, f) the cost of rotating r rows by form f (``rotation_costs``). Inference: "input" rot(n, factored) +
        C₀, "assembled" rot(n, assembled) + C₀, "weight" min_f rot(out, f) + C₀ (an Embedding's: its num table rows).
        Training triples every rotation (its two backward products) and adds the base's backward: the input paths
        back-propagate through W (C₀), the weight path forms dW' (C₀) and dx when the input needs it (C₀): 3·rot +
        2·C₀, and 3·rot + (2 + g)·C₀ with g = 1 when the input needs a gradient; an Embedding's weight path scatters
        its n rows of gradient into the table (n·d).
        """
        base = self.base_layer
        dtype = self.skew.dtype if self.quantized_base else base.weight.dtype  # (a packed weight has no float dtype)
        n, base_cost = base_layers.vectors(base, x_shape)[1], base_layers.base_cost(base, x_shape)
        on_rows = self.rotation_costs(n, dtype)
        rotation = {"input": on_rows["factored"], "assembled": on_rows["assembled"]}
        if "weight" in self.paths():
            rotation["weight"] = min(self.rotation_costs(base_layers.weight_shape(base)[0], dtype).values())
        if not training:
            return {p: r + base_cost for p, r in rotation.items()}
        costs = {p: 3 * r + (3 if p == "weight" and input_requires_grad else 2) * base_cost
                 for p, r in rotation.items()}
        if self.rotates_outputs and "weight" in costs:
            costs["weight"] += n * self.fan_in
        return costs

    # --- forward ---
    def rotated_weight(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """diag(s) · W · Rᵀ in the layout and dtype of ``base_layers.weight`` (ValueError for a quantized base); W's
        rows rotated by the cheaper form."""
        weight = base_layers.weight(self.base_layer)
        rotated = self.rotate(weight.reshape(self.out_features, self.fan_in), transpose=True, blocks=blocks)
        if self.scale is not None:
            rotated = rotated * self.scale.to(rotated.dtype)[:, None]
        return rotated.reshape(weight.shape)

    def rotated_table(self, blocks: torch.Tensor | None = None) -> torch.Tensor:
        """An Embedding's table as its lookups are adapted: W · R · diag(s), (num, d), the padding row W's own."""
        table = self.base_layer.weight
        rotated = self.rotate(table, blocks=blocks)  # each row e -> e R
        if self.scale is not None:
            rotated = rotated * self.scale.to(rotated.dtype)
        return self._keep_padding(torch.arange(table.shape[0], device=table.device), table, rotated)

    def _keep_padding(self, ids: torch.Tensor, base_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` with the base's row wherever ``ids`` is the Embedding's padding_idx. ids: (...), rows: (..., d)."""
        padding_idx = self.base_layer.padding_idx
        return rows if padding_idx is None else torch.where((ids == padding_idx)[..., None], base_rows, rows)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.rotates_outputs:
            return self._embedding_forward(x)
        base = self.base_layer
        base_layers.check_input(base, x)
        blocks = self.orthogonal_blocks()
        path = self.choose_path(x)
        if path == "weight":
            return base_layers.run(base, x, self.rotated_weight(blocks))
        form = "factored" if path == "input" else "assembled"
        if base_layers.computes_in_own_dtype(base):  # bitsandbytes, or dequantized from it: call it on Rᵀx
            return self._own_kernel_path(x, blocks, form)
        rotated = self.rotate(base_layers.input_rows(base, x), blocks=blocks, form=form)  # each row (Rᵀx) times R
        if self.scale is None:
            return base_layers.rows_times_weight(base, rotated, x.shape, base.bias)
        return self._scale_and_shift(base_layers.rows_times_weight(base, rotated, x.shape))

    def _scale_and_shift(self, y: torch.Tensor) -> torch.Tensor:
        """s ⊙ y + bias, with s and bias broadcast over the output channels (one fused addcmul when both are there)."""
        bias, shape = self.base_layer.bias, base_layers.channel_shape(self.base_layer)
        bias = None if bias is None else bias.to(y.dtype).reshape(shape)
        if self.scale is None:
            return y if bias is None else y + bias
        scale = self.scale.to(y.dtype).reshape(shape)
        return y * scale if bias is None else torch.addcmul(bias, y, scale)

    def _embedding_forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (...) -> (..., d): the base's rows e as e · R · diag(s), padding rows the base's."""
        blocks = self.orthogonal_blocks()
        path = self.choose_path(ids)
        if path == "weight":
            return base_layers.run(self.base_layer, ids, self.rotated_table(blocks))
        rows = self.base_layer(ids)  # (..., d): the base's own lookup
        rotated = self.rotate(rows, blocks=blocks, form="factored" if path == "input" else "assembled")
        if self.scale is not None:
            rotated = rotated * self.scale.to(rotated.dtype)
        rotated = base_layers.with_table_gradient(self.base_layer, ids, rotated)  # as the table's (weight path)
        return self._keep_padding(ids, rows, rotated)

    def _own_kernel_path(self, x: torch.Tensor, blocks: torch.Tensor, form: str) -> torch.Tensor:
        """h = base(Rᵀx) by the layer's own kernel (a quantized layer's), then h + (s − 1) ⊙ (h − bias) =
        s ⊙ (W Rᵀx) + bias, written so that s = 1 adds exactly nothing."""
        h = self.base_layer(self.rotate(x, blocks=blocks, form=form))
        if self.scale is None:
            return h
        bias = self.base_layer.bias
        return h + (self.scale.to(h.dtype) - 1) * (h if bias is None else h - bias.to(h.dtype))

    # --- merging ---
    def merged_weights(self) -> dict[str, torch.Tensor]:
        """W' = diag(s)·W·Rᵀ (an Embedding's table: W·R·diag(s), the padding row W's own) from the eval-mode blocks,
        computed in fp64 and rounded once to W's dtype, in the base's own layout (``base_layers.stored``).

        ValueError, before anything is written, where unmerge could not undo it: an output scale of exactly 0 or a
        singular block (the Cayley–Neumann series with neumann_terms ≡ 1 mod 4 can be); and for a quantized base
        (``base_layers.weight`` says why).
        """
        self._check_scale_invertible("merge")
        base, weight = self.base_layer, base_layers.weight(self.base_layer)
        blocks = self.cayley_blocks(merge_dtype(weight))
        if torch.isfinite(blocks).all():  # (NaN/inf blocks: the merged weight is not finite, which merge refuses)
            inverse_transposed_blocks(blocks)  # raises for a singular block
        embedding = self.rotates_outputs
        rows = weight.reshape(-1, self.fan_in).to(merge_dtype(weight))
        # a Linear's or conv's rows become W Rᵀ; an Embedding's rows e become e R, as its lookups do; by the weight
        # path's form
        merged = self.rotate(rows, transpose=not embedding, blocks=blocks.to(rows.dtype))
        if self.scale is not None:
            merged = merged * (self.scale.to(rows.dtype) if embedding else self.scale.to(rows.dtype)[:, None])
        if embedding:
            merged = self._keep_padding(torch.arange(len(rows), device=rows.device), rows, merged)
        return base_layers.stored(base, merged.reshape(weight.shape).to(weight.dtype))

    def unmerged_weights(self) -> dict[str, torch.Tensor]:
        """W = diag(s)⁻¹·W'·R⁻ᵀ (an Embedding's table: W'·diag(s)⁻¹·R⁻¹, the padding row kept) from every block
        inverted (``inverse_transposed_blocks``), so exact for the Cayley–Neumann series too; the same form as the
        merge, computed in fp64 and rounded once to W's dtype."""
        self._check_scale_invertible("unmerge")
        base, weight = self.base_layer, base_layers.weight(self.base_layer)
        embedding = self.rotates_outputs
        rows = weight.reshape(-1, self.fan_in).to(merge_dtype(weight))
        merged = rows
        if self.scale is not None:
            merged = rows / (self.scale.to(rows.dtype) if embedding else self.scale.to(rows.dtype)[:, None])
        inverse = inverse_transposed_blocks(self.cayley_blocks(rows.dtype))
        # rows @ R⁻ᵀ for a Linear's or conv's W'; an Embedding's rows times R⁻¹ = (R⁻ᵀ)ᵀ, the blocks applied transposed
        restored = self.rotate(merged, transpose=embedding, blocks=inverse)
        if embedding:
            restored = self._keep_padding(torch.arange(len(rows), device=rows.device), rows, restored)
        return base_layers.stored(base, restored.reshape(weight.shape).to(weight.dtype))

    def _check_scale_invertible(self, action: str) -> None:
        if self.scale is None or not (self.scale == 0).any():
            return
        rows = (self.scale == 0).nonzero().flatten().tolist()
        raise ValueError(
            f"cannot {action}: the output scale is exactly 0 at {len(rows)} row(s) (e.g. row {rows[0]}), so "
            "W' = diag(s)·W·Rᵀ zeroes those rows and unmerge could not recover W there. Give those scales a non-zero "
            "value, or keep the adapter unmerged (its forward is exact)."
        )

    def n_effective(self) -> int:
        """b(b−1)/2 free entries per block (the skew-symmetric part) plus the output scale, as stored here."""
        return self.n_trainable()

    def extra_repr(self) -> str:
        return (
            f"block_size={self.block_size}, n_blocks={self.n_blocks}, n_factors={self.n_factors}, "
            + super().extra_repr()
        )
