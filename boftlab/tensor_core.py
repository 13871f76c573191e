"""Tensor-core adapters: FLoRA (Si et al., "Maintaining Structural Integrity in Parameter Spaces for Parameter
Efficient Fine-tuning", 2024) — a low-rank Tucker core for N-dimensional weights.

A frozen weight W keeps its own N-dimensional shape (d₁ × ⋯ × d_N, PyTorch layout) and learns

    ΔW = α · G ×₁ U₁ ×₂ U₂ ⋯ ×_N U_N,        W' = W + ΔW

* G (r₁ × ⋯ × r_N) is the small *core*; U_n (d_n × r_n) is the *factor* of mode n; ×_n is the mode-n product
  (contract mode n of the tensor with the columns of U_n). α is the paper's constant scale s (``alpha``, as in
  SURM).
* The modes are those of the weight in PyTorch's layout (``boftlab.base_layers``): linear layers (out, in) — nn.Linear,
  transformers' Conv1D (which stores the transpose), bitsandbytes' quantized layers (input path only: their weight is
  packed, so they are called, never dequantized, and merging into them is refused); Embedding (num_embeddings,
  embedding_dim); Conv1d/2d/3d (out, in/groups, k…). A grouped or depthwise conv therefore has an in/groups mode (1 for depthwise),
  whose factor is shared by every group — exactly the tensor PyTorch stores.
* LoRA on a conv flattens W to out × (in/groups·kh·kw) and factorises that matrix: the kh×kw neighbourhood of a
  kernel becomes unrelated columns. Here every mode keeps its own factor, so the kernel's spatial modes share one
  small spatial basis across all channels (the paper's point: the change keeps the weight's topology).
* Parameters (stored, and the effective count, ``AdapterLayer.n_effective``): Π r_n + Σ d_n·r_n. The dimension of
  the set of updates is smaller — that of the Tucker tensors of multilinear rank r, stored minus the GL(r_n) gauge
  G ×_n M⁻¹, U_n M: Π r_n + Σ r_n(d_n − r_n) (``tucker_dimension``) — as LoRA's r(d + n) has an r² gauge;
  counts subtract neither, so they compare across methods.

Initialisation (ΔW = 0 at step 0, non-zero gradients). The core starts at zero and every factor with random
orthonormal columns. ∂L/∂G = α · ∂L/∂W ×₁ U₁ᵀ ⋯ ×_N U_Nᵀ is the weight gradient projected onto the factors'
subspaces — non-zero — while ∂L/∂U_n contains G and is zero: step 1 moves only the core, and from step 2 on all
factors train. (Zeroing one factor instead also works, but singles out one mode; a zero core treats all modes
alike, as the public FLoRA reference code does.) Orthonormal columns make G ↦ ΔW an isometry at step 0,
‖ΔW‖_F = α‖G‖_F, so α means the same thing for every layer size (that reference code draws the factors
Kaiming-normal instead, which multiplies ΔW by a layer-size–dependent factor).

Ranks: one int r means min(r, d_n) on every mode (so it fits a depthwise kernel's size-1 mode); a tuple is taken
as given, one rank per mode, and a rank above its mode's size is a ValueError listing the valid ranges.
Embedding: the factor row of ``padding_idx`` starts at zero and never gets a gradient, so the padding vector stays
the base's; with ``max_norm`` the rows of W + ΔW are renormalised (the frozen W itself is never written).

Two exact forward paths (the contract's names); ``auto`` picks the one with fewer multiply-adds per call
(``path_costs``):

* "weight": y = f(x; W + ΔW)                     — assemble ΔW from the factors, then one conv / matmul;
* "input":  y = f(x; W) + α · U_out ∘ conv(G ×ₖ Uₖ) ∘ U_inᵀ (x) — the base layer, plus the factorised chain on the
  activations, three cheap layers: project the input channels to r_in (1×1 conv), a conv with the small
  r_out × r_in × k kernel (the base's stride, padding, padding_mode, dilation, groups), expand to the output
  channels (1×1 conv). Linear: x U_in Gᵀ U_outᵀ; Embedding: U_num[x] G U_dimᵀ.

While training, the weight path pays a weight-gradient conv (as big as the forward one) that the input path
avoids, so the chain wins for wide convs with small ranks; for a depthwise conv the chain's middle conv is r_out
times the base conv and the weight path wins. The authors instead run the base conv plus a second full conv with
ΔW (two full convolutions); ``boftlab.bench.conv`` times that scheme against both paths.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import base_layers
from .base_layers import Conv1D
from .contract import AdapterConfig, AdapterLayer, autocast_off, check_number

_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --- Tucker algebra ---------------------------------------------------------------------------------------------------
def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """T ×_n M: tensor (…, r_n at ``mode``, …), matrix (d_n, r_n) -> (…, d_n at ``mode``, …). O(numel(T)·d_n)."""
    if tensor.shape[mode] != matrix.shape[1]:
        raise ValueError(
            f"mode_product: mode {mode} of the tensor has size {tensor.shape[mode]} but the matrix has "
            f"{matrix.shape[1]} columns; the matrix must be (d, {tensor.shape[mode]})"
        )
    return torch.movedim(torch.tensordot(tensor, matrix, dims=([mode], [1])), -1, mode)


def tucker_delta(core: torch.Tensor, factors: Sequence[torch.Tensor], alpha: float = 1.0) -> torch.Tensor:
    """α · G ×₁ U₁ ⋯ ×_N U_N: core (r₁, …, r_N), factors[n] (d_n, r_n) -> (d₁, …, d_N). O(tucker_flops)."""
    if len(factors) != core.dim():
        raise ValueError(f"tucker_delta: a core with {core.dim()} modes needs {core.dim()} factors, got {len(factors)}")
    out = core
    for mode, factor in enumerate(factors):
        out = mode_product(out, factor, mode)
    return out * alpha


def tucker_flops(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Multiply-adds of ``tucker_delta`` in mode order: Σ_k (Π_{j≤k} d_j)(Π_{j≥k} r_j)."""
    return sum(math.prod(shape[: k + 1]) * math.prod(ranks[k:]) for k in range(len(shape)))


def tucker_n_params(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Stored numbers of a Tucker adapter: Π r_n (core) + Σ d_n·r_n (factors)."""
    return math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))


def tucker_dimension(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Free parameters: dim of the Tucker tensors of multilinear rank r — Π r'_n + Σ r'_n(d_n − r'_n).

    r' are the ranks a generic core can reach: a mode-n unfolding of G has at most Π_{j≠n} r_j columns, so
    r'_n = min(r_n, Π_{j≠n} r'_j) (iterated until nothing changes). The count removes the gauge freedom
    G ×_n M_n⁻¹, U_n M_n of each mode (r'_n² numbers).
    """
    reach = list(ranks)
    changed = True
    while changed:
        changed = False
        for n in range(len(reach)):
            cap = math.prod(reach[:n] + reach[n + 1 :])
            if reach[n] > cap:
                reach[n], changed = cap, True
    return math.prod(reach) + sum(r * (d - r) for d, r in zip(shape, reach))


def resolve_ranks(shape: Sequence[int], ranks: int | Sequence[int], names: Sequence[str], what: str) -> tuple[int, ...]:
    """Per-mode ranks for a weight of ``shape``, or a ValueError listing the valid ones.

    One int r means min(r, d_n) on every mode (so ``ranks=8`` fits a 7×7 depthwise kernel (C, 1, 7, 7) as
    (8, 1, 7, 7)); a tuple is taken as given and must have one entry 1 ≤ r_n ≤ d_n per mode.
    """
    valid = ", ".join(f"{name} 1..{d}" for name, d in zip(names, shape))
    if isinstance(ranks, int):
        return tuple(min(ranks, d) for d in shape)
    ranks = tuple(ranks)
    if len(ranks) != len(shape):
        example = tuple(min(8, d) for d in shape)
        raise ValueError(
            f"ranks={ranks} has {len(ranks)} entries but the {what} weight {tuple(shape)} has {len(shape)} modes "
            f"({', '.join(names)}); give {len(shape)} ranks, e.g. ranks={example}, or one int for every mode"
        )
    bad = [n for n, (r, d) in enumerate(zip(ranks, shape)) if not 1 <= r <= d]
    if bad:
        nearest = tuple(min(max(r, 1), d) for r, d in zip(ranks, shape))
        which = ", ".join(f"ranks[{n}]={ranks[n]} for {names[n]}={shape[n]}" for n in bad)
        raise ValueError(
            f"{which} of the {what} weight {tuple(shape)}: a mode's rank must be between 1 and its size. "
            f"Valid ranks per mode: {valid}; nearest valid: ranks={nearest} "
            f"(a single int r means min(r, mode size) on every mode)"
        )
    return ranks


def orthonormal_columns(rows: int, cols: int, dtype: torch.dtype, device: torch.device | None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """(rows, cols) with random orthonormal columns (QR of a Gaussian), cols ≤ rows: Haar-distributed, so with
    rows = cols a Haar-random orthogonal matrix. O(rows·cols²)."""
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # Haar-distributed (fixes QR's sign convention; Mezzadri 2007)
    # QR's Q is column-major; a saved adapter loads back row-major, and the same values in another layout round
    # differently in a matmul: contiguous from the start, so a loaded adapter computes bit for bit what was saved
    return q.to(dtype=dtype, device=device).contiguous()


# --- config -----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TensorCoreConfig(AdapterConfig):
    """FLoRA: ΔW = α · G ×₁ U₁ ⋯ ×_N U_N on the weight's own N modes.

    ranks: one int r (min(r, d_n) on every mode) or one int per mode of the stored weight, e.g. (8, 8, 3, 3) for a
    Conv2d (out, in/groups, kh, kw); ranks equal to the kernel size leave the kernel modes unrestricted (a full
    k × k spatial core, one invertible k × k factor per spatial mode).
    alpha (α): the paper's constant s multiplying ΔW (named as in SURM).
    path: "auto" picks the cheaper exact forward per call; "input" (the factorised chain) / "weight" force one.
    """

    family: ClassVar[str] = "tensor_core"
    #: values each option takes in seeded random tests (tests/test_round_trips.py; one that the config or the layer
    #: refuses leaves the option at its default)
    option_space: ClassVar[dict[str, tuple]] = dict(ranks=(1, 2, 3), alpha=(-1.4, -0.8, -0.3, 0.3, 0.8, 1.4))
    examples: ClassVar[tuple[dict, ...]] = (dict(ranks=3, alpha=0.5),)

    ranks: int | tuple[int, ...] = 8
    alpha: float = 1.0
    path: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.ranks, list):
            self.ranks = tuple(self.ranks)
        entries = self.ranks if isinstance(self.ranks, tuple) else (self.ranks,)
        if not entries or any(isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1 for r in entries):
            raise ValueError(
                f"ranks must be an int ≥ 1 (every mode) or a tuple of ints ≥ 1 (one per mode), got {self.ranks!r}"
            )
        self.ranks = tuple(int(r) for r in self.ranks) if isinstance(self.ranks, tuple) else int(self.ranks)
        self.alpha = check_number("alpha", self.alpha)
        if self.alpha == 0:
            raise ValueError("alpha=0 makes ΔW and every adapter gradient zero; use a non-zero alpha, e.g. 1.0")
        self.check_path()

    def supported_layers(self) -> tuple[type[nn.Module], ...]:
        return (nn.Linear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)

    def layer_class(self) -> type["TensorCoreLayer"]:
        return TensorCoreLayer


# --- the layer --------------------------------------------------------------------------------------------------------
class TensorCoreLayer(AdapterLayer):
    """A frozen linear layer, Conv1d/2d/3d or Embedding with W' = W + α · G ×₁ U₁ ⋯ ×_N U_N (modes of W in
    PyTorch's layout, ``base_layers.weight_shape``)."""

    def __init__(self, base_layer: nn.Module, config: TensorCoreConfig) -> None:
        super().__init__(base_layer, config)
        self.weight_shape = base_layers.weight_shape(base_layer)
        self.mode_names = base_layers.mode_names(base_layer)
        self.ranks = resolve_ranks(self.weight_shape, config.ranks, self.mode_names, type(base_layer).__name__)
        self.check_forced_path({
            "input": "cannot reproduce an Embedding with max_norm (it renormalises rows of W + ΔW, not of W and ΔW "
                     "separately)",
            "weight": "needs the base weight, which this quantized layer stores packed (bitsandbytes)",
        })

        factory = {"device": base_layer.weight.device, "dtype": torch.float32}
        # zero core -> ΔW = 0: the adapted layer equals the base layer at step 0 (see the module docstring).
        self.core = nn.Parameter(torch.zeros(self.ranks, **factory))
        self.factors = nn.ParameterList(
            [nn.Parameter(orthonormal_columns(d, r, **factory)) for d, r in zip(self.weight_shape, self.ranks)]
        )
        if isinstance(base_layer, nn.Embedding) and base_layer.padding_idx is not None:
            # the padding row gets no gradient (F.embedding blocks it), so a zero row keeps ΔW[padding_idx] = 0
            # for good: the padding vector stays the base's, as padding_idx promises.
            with torch.no_grad():
                self.factors[0][base_layer.padding_idx].zero_()

    # --- the update ---
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """ΔW = α · G ×₁ U₁ ⋯ ×_N U_N computed in ``dtype`` (default: the adapter's), shape of the base weight.
        O(tucker_flops).

        Assembled outside autocast: the small products stay in that precision (under autocast each tensordot would
        round to half precision and the next one would mix dtypes). Merges pass fp64, so a bf16 adapter is not
        rounded to bf16 on its way into an fp32 weight.
        """
        dtype = dtype or self.core.dtype
        with autocast_off(self.core.device):
            return tucker_delta(self.core.to(dtype), [f.to(dtype) for f in self.factors], self.config.alpha)

    # --- choosing a path ---
    def paths(self) -> tuple[str, ...]:
        """Both paths, except for an Embedding with max_norm (it renormalises rows of W + ΔW as one) and a quantized
        layer (its packed weight cannot take ΔW: only the base call plus the chain)."""
        if base_layers.renormalises_in_place(self.base_layer):
            return ("weight",)
        if self.quantized_base:
            return ("input",)
        return ("input", "weight")

    def path_costs(self, x_shape: Sequence[int], training: bool, input_requires_grad: bool) -> dict[str, int]:
        """Estimated multiply-adds of one call on an input of ``x_shape``, per path.

        C₀ = the base layer's own product, A = assembling ΔW (``tucker_flops``), F = the factorised chain.
        Inference: weight C₀ + A, input C₀ + F. Training (backward included): the weight path computes ∂L/∂W'
        (another C₀), ∂L/∂x (C₀ if the input needs it) and back-propagates the assembly (2A); the input path
        back-propagates the frozen base only to x and the chain twice (∂input, ∂factors):
        weight (2 + g)·C₀ + 3A, input (1 + g)·C₀ + 3F, with g = 1 when the input needs a gradient.
        """
        base, (out, fan) = self.base_layer, self.weight_shape[:2]
        r_out, r_in = self.ranks[:2]
        assembly = tucker_flops(self.weight_shape, self.ranks)
        base_cost, (n_in, n_out) = base_layers.base_cost(base, x_shape), base_layers.vectors(base, x_shape)
        if isinstance(base, nn.Embedding):  # n_in = n_out = the looked-up ids
            chain = n_out * (r_out * r_in + r_in * fan)
            if training:  # the weight path also scatters the rows' gradient into ∂L/∂W'
                costs = {"input": 3 * chain, "weight": 3 * assembly + n_out * fan}
            else:
                costs = {"input": chain, "weight": assembly}
            return {path: costs[path] for path in self.paths()}
        # project the in (= groups·fan) channels to groups·r_in, the small grouped conv with the core's k… kernel,
        # expand to out channels; a linear layer is the case groups = 1, no kernel modes, n_in = n_out = its rows
        kernel, groups = math.prod(self.weight_shape[2:]), getattr(base, "groups", 1)
        chain = n_in * groups * fan * r_in + n_out * groups * r_out * r_in * kernel + n_out * out * r_out
        if training:
            g = int(input_requires_grad)
            costs = {"input": (1 + g) * base_cost + 3 * chain, "weight": (2 + g) * base_cost + 3 * assembly}
        else:
            costs = {"input": base_cost + chain, "weight": base_cost + assembly}
        return {path: costs[path] for path in self.paths()}

    # --- forward ---
    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.choose_path(x) == "input":
            return self._factorised_forward(x)
        # the base's own call with W + ΔW (stride, padding, padding_idx, … honoured; an Embedding's max_norm
        # renormalises rows of this temporary W', never of the frozen W)
        dtype = torch.promote_types(self.base_layer.weight.dtype, self.core.dtype)  # the wider of W's and ΔW's
        return base_layers.run(self.base_layer, x, self.shifted_weight(dtype))

    def _factorised_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        core = self.core.to(x.dtype) if not isinstance(base, nn.Embedding) else self.core
        factors = [f.to(core.dtype) for f in self.factors]
        u_out, u_in = factors[:2]
        if isinstance(base, nn.Embedding):
            rows = F.embedding(x, u_out, base.padding_idx)  # (..., r_num)
            # each row's gradient as the table's on the weight path (padding_idx, scale_grad_by_freq)
            delta = base_layers.with_table_gradient(base, x, rows @ core @ u_in.T)  # (..., embedding_dim)
            return base(x) + (self.config.alpha * delta).to(base.weight.dtype)
        if base_layers.is_linear(base):
            delta = x @ u_in @ core.T @ u_out.T  # (..., in) -> (..., r_in) -> (..., r_out) -> (..., out)
            return base(x) + self.config.alpha * delta
        groups, n_spatial = base.groups, len(base.kernel_size)
        conv, ones = _CONV_FUNCTIONS[n_spatial], (1,) * n_spatial
        r_out, r_in = self.ranks[:2]
        kernel = core
        with autocast_off(core.device):  # as in delta_weight
            for mode in range(2, core.dim()):
                kernel = mode_product(kernel, factors[mode], mode)  # (r_out, r_in, k…): the core in pixel space
        project = u_in.T.reshape(r_in, -1, *ones).repeat(groups, 1, *ones)  # (groups·r_in, in/groups, 1…)
        z = conv(x, project, groups=groups)  # (B, groups·r_in, *spatial): each group's channels -> r_in
        z = base._conv_forward(z, kernel.repeat(groups, *(1,) * (core.dim() - 1)), None)  # (B, groups·r_out, *out)
        delta = conv(z, u_out.reshape(*u_out.shape, *ones), groups=groups)  # (B, out, *out): r_out -> out/groups
        return base._conv_forward(x, base.weight, base.bias) + self.config.alpha * delta

    def extra_repr(self) -> str:
        shapes = f"weight_shape={self.weight_shape}, ranks={self.ranks}, alpha={self.config.alpha}, "
        return shapes + super().extra_repr()
