"""Structured unrestricted-rank matrices (SURM; Sehanobish et al., NeurIPS 2024) as LoRA-style and adapter-style PEFT.

LoRA learns a low-rank ΔW = BA: cheap, but rank ≤ r. SURM learns a *structured* S instead — a matrix described by
O(d) numbers that is nonetheless (generically) full-rank, and that multiplies a vector in O(d log d) by the FFT:

* circulant      C = circ(c),       C[i, j] = c[(i − j) mod n]                      n numbers
* Toeplitz       T,                 T[i, j] = t[i − j + d_in − 1]                   d_out + d_in − 1 numbers
* Kronecker      A ⊗ B,             A: m1 × n1, B: m2 × n2, m1·m2 = d_out, n1·n2 = d_in    m1·n1 + m2·n2 numbers
* LDR, rank r    L = Σ_{i<r} Z_1(g_i) · Z_{−1}(h_i)                                 2·r·n numbers

Z_f(v) is the f-circulant with first column v: Z_1(v) is circulant, Z_{−1}(v) skew-circulant (entries that wrap
around the corner change sign). The LDR class is exactly the set of matrices whose *displacement*
∇(M) = Z_1·M − M·Z_{−1} has rank ≤ r (the displacement rank): since ∇(Z_1(g)·Z_{−1}(h)) = 2·g·(J h)ᵀ (J reverses a
vector) and ∇ is invertible (Z_1 and Z_{−1} have disjoint spectra), every n × n matrix is an LDR matrix with r = n,
a circulant has displacement rank ≤ 1 and a Toeplitz matrix ≤ 2. The displacement rank r, not the matrix rank, is
the knob between compactness (2rn numbers) and expressiveness.

Rectangular layers (d_out ≠ d_in). Circulant and LDR matrices are defined for the square size n = max(d_out, d_in)
and cropped to their top-left d_out × d_in block (inputs are zero-padded to n, outputs truncated to d_out); every
stored number still reaches the crop. Toeplitz and Kronecker matrices are natively rectangular. Parameter counts:

    circulant  max(d_out, d_in)        Toeplitz  d_out + d_in − 1        Kronecker  m1·n1 + m2·n2
    LDR        2 · r · max(d_out, d_in)

The two uses of the paper:

* LoRA-style (mode="lora"):    W' = W + α·S,        y = W x + α·S x + bias             (S: d_out × d_in)
  on linear layers and on nn.Conv1d / nn.Conv2d / nn.Conv3d (below);
* adapter-style (mode="adapter"): y = h + f(α·S h) + b,  h = W x + bias                 (S: d_out × d_out)
  inserted on the output of the targeted Linear — on BERT's ``attention.output.dense`` and ``output.dense`` this
  is the paper's placement, after the projection and before the residual LayerNorm. Linear layers only.

Linear layers are nn.Linear, transformers' Conv1D (GPT-2; W read as the transpose of what it stores) and bitsandbytes'
quantized Linear4bit / Linear8bitLt (``boftlab.base_layers``): both modes only *call* the base layer and add S's
products beside it, so a quantized base is never dequantized — and merging into it is refused, since re-quantizing
W + α·S would round it again.

Convolutions (mode="lora"). A kernel W: (out, in/groups, *k) is the matrix W: (out, in/groups·prod(k)), each row one
output channel's weights over an input patch, flattened channel-major as (out, in/g, *k) -> (out, rest); so S is
d_out × d_in with d_out = out, d_in = in/groups·prod(k), the parameter counts above hold with those sizes, and
y = conv(x; W + α·S reshaped to W's shape) — one conv with the base layer's stride, padding, dilation, groups and
padding_mode (not the base conv plus a second conv with α·S: the same result from one forward conv). Here S *is*
formed: applying it without forming it would need every input patch unfolded (prod(k) copies of the activations),
while a conv's S is the size of its frozen kernel, so forming it costs no more memory than the kernel itself. It is
formed only at that size, never as the n × n square that circulant and LDR matrices are cropped from (for a 3×3
conv 64 -> 64 that square would be 576 × 576, nine times the 64 × 576 kernel): ``circulant`` gathers
c[(i − j) mod n] for the block's entries alone and ``ldr_block`` applies FFT products to the block's short side.
Linear layers keep the FFT products, which never form S at all.

Identity at init with gradients: S starts at exactly 0 and S depends linearly (circulant, Toeplitz) or
bilinearly (Kronecker, LDR) on its parameters. A linear S = Σ_k c_k·P_k has ∂L/∂c_k = ⟨∂L/∂S, P_k⟩, which does not
depend on c, so c = 0 already receives gradient. For the bilinear ones one factor starts at 0 and the other random
(as LoRA does): B = 0 in A ⊗ B and g = 0 in Σ Z_1(g_i)·Z_{−1}(h_i), so ∂L/∂B and ∂L/∂g are non-zero at step 0.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import base_layers
from .base_layers import CONVOLUTIONS, Conv1D
from .contract import AdapterConfig, AdapterLayer, check_integer, check_number, merge_dtype, nearest

STRUCTURES = ("circulant", "toeplitz", "kronecker", "ldr")
MODES = ("lora", "adapter")


def identity(x: torch.Tensor) -> torch.Tensor:
    """f(x) = x: the adapter activation that keeps it linear, hence mergeable (a named function, so layers pickle)."""
    return x


#: adapter non-linearities, all with f(0) = 0 (so S = 0 is the identity) and f'(0) ≠ 0 (so S = 0 still learns);
#: ReLU is left out on purpose: relu'(0) = 0 in autograd, so a zero-initialised S would never move.
ACTIVATIONS = {"identity": identity, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64: FFTs in half precision lose too many digits."""
    return torch.promote_types(dtype, torch.float32)


def _fft_size(n: int) -> int:
    """The smallest 2^a·3^b·5^c ≥ n: FFT lengths with small prime factors are the fast ones."""
    size = n
    while True:
        rest = size
        for p in (2, 3, 5):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return size
        size += 1


# --- fast products -------------------------------------------------------------------------------------------------
def circulant_matvec(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """C x with C = circ(c) (first column c): c: (..., n), x: (..., n) -> (..., n), O(n log n). Cyclic convolution."""
    n = c.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(c, n=n) * torch.fft.rfft(x, n=n), n=n)


def skew_circulant_matvec(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Z_{−1}(c) x (skew-circulant, first column c): (..., n), (..., n) -> (..., n), O(n log n).

    A negacyclic convolution: the linear convolution p = c ∗ x (length 2n − 1, via a real FFT of length ≥ 2n) folded
    back with a sign, y_i = p_i − p_{i+n}.
    """
    n = c.shape[-1]
    size = _fft_size(2 * n)
    full = torch.fft.irfft(torch.fft.rfft(c, n=size) * torch.fft.rfft(x, n=size), n=size)
    return full[..., :n] - full[..., n : 2 * n]


def toeplitz_matvec(t: torch.Tensor, x: torch.Tensor, d_out: int) -> torch.Tensor:
    """T x with T[i, j] = t[i − j + d_in − 1]: t: (d_out + d_in − 1,), x: (..., d_in) -> (..., d_out), O(d log d).

    y_i = Σ_j t[i + d_in − 1 − j]·x_j is entry i + d_in − 1 of the linear convolution t ∗ x. A cyclic convolution of
    length L ≥ len(t) aliases only entries below d_in − 1, which are not needed.
    """
    d_in = x.shape[-1]
    size = _fft_size(t.shape[-1])
    full = torch.fft.irfft(torch.fft.rfft(t, n=size) * torch.fft.rfft(x, n=size), n=size)
    return full[..., d_in - 1 : d_in - 1 + d_out]


def kronecker_matvec(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B) x: a: (m1, n1), b: (m2, n2), x: (..., n1·n2) -> (..., m1·m2), O(d·(n1 + m2)) per row.

    With x viewed row-major as X (n1 × n2), (A ⊗ B) x is A X Bᵀ viewed row-major (torch.kron's index order).
    """
    (m1, n1), (m2, n2) = a.shape, b.shape
    x = x.reshape(*x.shape[:-1], n1, n2)  # (..., n1, n2)
    y = torch.einsum("ij,...jk,lk->...il", a, x, b)  # (..., m1, m2)
    return y.reshape(*y.shape[:-2], m1 * m2)


def ldr_matvec(g: torch.Tensor, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ_i Z_1(g_i)·Z_{−1}(h_i)·x: g, h: (r, n), x: (..., n) -> (..., n), O(r·n log n)."""
    n = x.shape[-1]
    u = skew_circulant_matvec(h, x.unsqueeze(-2))  # (..., r, n): Z_{−1}(h_i) x for each i
    spectrum = (torch.fft.rfft(g, n=n) * torch.fft.rfft(u, n=n)).sum(-2)  # Σ_i over frequencies: one inverse FFT
    return torch.fft.irfft(spectrum, n=n)


# --- dense matrices (tests, merging, figures, a conv's kernel; never in a Linear's forward pass) ---------------------
def _differences(n: int, d_out: int | None, d_in: int | None, device: torch.device) -> torch.Tensor:
    """(d_out, d_in) (default n × n) table of i − j: the diagonal that entry (i, j) of a Toeplitz-like matrix is on."""
    i = torch.arange(n if d_out is None else d_out, device=device)
    j = torch.arange(n if d_in is None else d_in, device=device)
    return i[:, None] - j[None, :]


def circulant(c: torch.Tensor, d_out: int | None = None, d_in: int | None = None) -> torch.Tensor:
    """(..., n) -> (..., d_out, d_in) with C[i, j] = c[(i − j) mod n]: the whole n × n circulant by default, else its
    top-left d_out × d_in block (d_out, d_in ≤ n), gathered entry by entry without forming the square."""
    n = c.shape[-1]
    return c[..., _differences(n, d_out, d_in, c.device) % n]


def skew_circulant(c: torch.Tensor, d_out: int | None = None, d_in: int | None = None) -> torch.Tensor:
    """(..., n) -> (..., d_out, d_in) (default n × n) with Z[i, j] = c[i − j] for i ≥ j and −c[n + i − j] above the
    diagonal; a block is gathered without forming the square, as in ``circulant``."""
    n = c.shape[-1]
    diff = _differences(n, d_out, d_in, c.device)
    sign = torch.where(diff >= 0, 1.0, -1.0).to(c.dtype)
    return sign * c[..., diff % n]


def toeplitz(t: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """(d_out + d_in − 1,) -> (d_out, d_in) with T[i, j] = t[i − j + d_in − 1] (t[0] is the top-right corner)."""
    i, j = torch.arange(d_out, device=t.device), torch.arange(d_in, device=t.device)
    return t[i[:, None] - j[None, :] + d_in - 1]


def ldr(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(r, n), (r, n) -> (n, n): Σ_i Z_1(g_i)·Z_{−1}(h_i), as r dense products. O(r·n³)."""
    return (circulant(g) @ skew_circulant(h)).sum(0)


def ldr_block(g: torch.Tensor, h: torch.Tensor, d_out: int, d_in: int) -> torch.Tensor:
    """(r, n), (r, n) -> (d_out, d_in): the top-left block of Σ_i Z_1(g_i)·Z_{−1}(h_i), n = max(d_out, d_in), with no
    n × n intermediate. O(r·d_out·d_in) memory, O(r·d_out·d_in·log n) time.

    The product's inner size is n, so the block needs rows Z_1(g)[:d_out, :] (d_out × n) and columns
    Z_{−1}(h)[:, :d_in] (n × d_in), and one of the two is the whole n × n square. Only the one on the block's short
    side is gathered; the other factor is applied to it by FFT:

    * d_out = n: columns, Z_1(g_i)·(Z_{−1}(h_i)[:, :d_in]), a circulant product per gathered column;
    * d_in = n: rows, (Z_1(g_i)[:d_out, :])·Z_{−1}(h_i), i.e. Z_{−1}(h_i)ᵀ applied to each gathered row, where
      Z_{−1}(h)ᵀ = Z_{−1}(h₀, −h_{n−1}, …, −h₁) is skew-circulant again.
    """
    n = g.shape[-1]
    if d_out == n:
        columns = skew_circulant(h, n, d_in).transpose(-1, -2)  # (r, d_in, n): row j is column j of Z_{−1}(h_i)
        return circulant_matvec(g.unsqueeze(-2), columns).sum(0).T  # (r, d_in, n) -> (d_in, n) -> (d_out, d_in)
    transposed = torch.cat([h[..., :1], -h[..., 1:].flip(-1)], dim=-1)  # (r, n): Z_{−1}(h_i)ᵀ = Z_{−1}(transposed_i)
    rows = circulant(g, d_out, n)  # (r, d_out, n): rows of Z_1(g_i)
    return skew_circulant_matvec(transposed.unsqueeze(-2), rows).sum(0)  # (r, d_out, n) -> (d_out, d_in)


def shift_matrix(n: int, f: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The unit f-circulant Z_f (n × n): ones below the diagonal and f in the top-right corner."""
    z = torch.diag(torch.ones(n - 1, dtype=dtype), -1)
    z[0, -1] = f
    return z


def displacement(matrix: torch.Tensor) -> torch.Tensor:
    """(n, n) -> ∇(M) = Z_1·M − M·Z_{−1}, (n, n), O(n²): rows rolled down minus columns shifted left (sign-wrapped)."""
    rolled_rows = torch.roll(matrix, 1, dims=0)  # Z_1 M
    shifted_cols = torch.cat([matrix[:, 1:], -matrix[:, :1]], dim=1)  # M Z_{−1}
    return rolled_rows - shifted_cols


def displacement_rank(matrix: torch.Tensor, rtol: float = 1e-9) -> int:
    """The rank of ∇(M): 1 for a circulant, ≤ 2 for a Toeplitz, ≤ r for an LDR matrix of rank r."""
    s = torch.linalg.svdvals(displacement(matrix.double()))
    return int((s > rtol * s[0]).sum()) if s[0] > 0 else 0


def ldr_generators(matrix: torch.Tensor, displacement_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, n) -> g, h: (r, n) with ∇(Σ Z_1(g_i)·Z_{−1}(h_i)) the best rank-r approximation of ∇(M). O(n³).

    From ∇(Z_1(g)·Z_{−1}(h)) = 2·g·(J h)ᵀ: with ∇(M) ≈ Σ σ_i u_i v_iᵀ take g_i = √(σ_i/2)·u_i, h_i = √(σ_i/2)·J v_i
    (the scale split evenly between the two). With r = n the result is M exactly.
    """
    u, s, vh = torch.linalg.svd(displacement(matrix))
    scale = (s[:displacement_rank] / 2).sqrt()[:, None]
    return scale * u[:, :displacement_rank].T, scale * vh[:displacement_rank].flip(-1)


# --- shapes and parameter counts ------------------------------------------------------------------------------------
def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def default_kronecker_shape(d_out: int, d_in: int) -> tuple[int, int]:
    """(m1, n1) for A: the divisors of d_out and d_in nearest their square roots.

    Both factors near-square keep A ⊗ B full-rank-capable (rank(A ⊗ B) = rank A · rank B); the parameter-minimising
    shape would be degenerate (A 1 × d_in ⊗ B d_out × 1 is a rank-1 outer product).
    """
    return nearest(round(math.sqrt(d_out)), divisors(d_out)), nearest(round(math.sqrt(d_in)), divisors(d_in))


def resolve_kronecker_shape(d_out: int, d_in: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    """The shape (m1, n1) of A in A ⊗ B for a d_out × d_in matrix, or a ValueError listing the valid choices."""
    if shape is None:
        m1, n1 = default_kronecker_shape(d_out, d_in)
        count = m1 * n1 + (d_out // m1) * (d_in // n1)
        if count >= d_out * d_in:
            raise ValueError(
                f"the default Kronecker factor shape for a {d_out} × {d_in} matrix, A {m1} × {n1}, stores {count} "
                f"numbers, no fewer than the dense matrix ({d_out * d_in}): the sizes have no divisor near their square "
                f"roots (divisors of {d_out}: {divisors(d_out)}; of {d_in}: {divisors(d_in)}). Pass "
                f"kronecker_shape=(m1, n1) with m1 | {d_out} and n1 | {d_in}, or use another structure."
            )
        return m1, n1
    if len(shape) != 2:
        raise ValueError(f"kronecker_shape is the shape (rows, cols) of the first factor A, got {shape!r}")
    m1, n1 = shape
    if m1 < 1 or n1 < 1 or d_out % m1 or d_in % n1:
        suggestion = (nearest(m1, divisors(d_out)), nearest(n1, divisors(d_in)))
        raise ValueError(
            f"kronecker_shape={tuple(shape)} does not fit a {d_out} × {d_in} matrix: A's rows must divide "
            f"d_out={d_out} (valid: {divisors(d_out)}) and its columns must divide d_in={d_in} (valid: "
            f"{divisors(d_in)}); nearest valid kronecker_shape: {suggestion}."
        )
    return int(m1), int(n1)


def check_displacement_rank(displacement_rank: int, size: int) -> None:
    """ValueError unless 1 ≤ r ≤ n (r = n already reaches every n × n matrix)."""
    if not isinstance(displacement_rank, int) or not 1 <= displacement_rank <= size:
        hint = ""
        if isinstance(displacement_rank, (int, float)):
            hint = f"; nearest valid: {min(max(round(displacement_rank), 1), size)}"
        raise ValueError(
            f"displacement_rank={displacement_rank!r} is invalid for an LDR matrix of size n={size}: it must be an "
            f"integer in 1..{size} (r = n already represents every n × n matrix){hint}."
        )


def parameter_count(
    structure: str,
    d_out: int,
    d_in: int,
    displacement_rank: int = 1,
    kronecker_shape: tuple[int, int] | None = None,
    rank: int = 1,
) -> int:
    """Numbers stored by a d_out × d_in structured matrix (``structure="low_rank"``: r·(d_out + d_in), for comparison)."""
    size = max(d_out, d_in)
    if structure == "circulant":
        return size
    if structure == "toeplitz":
        return d_out + d_in - 1
    if structure == "kronecker":
        m1, n1 = resolve_kronecker_shape(d_out, d_in, kronecker_shape)
        return m1 * n1 + (d_out // m1) * (d_in // n1)
    if structure == "ldr":
        check_displacement_rank(displacement_rank, size)
        return 2 * displacement_rank * size
    if structure == "low_rank":
        return rank * (d_out + d_in)
    raise ValueError(f"unknown structure {structure!r}; valid: {STRUCTURES + ('low_rank',)}")


# --- the structured matrix as a module ------------------------------------------------------------------------------
class StructuredMatrix(nn.Module):
    """A trainable d_out × d_in structured matrix S. ``forward``: (..., d_in) -> (..., d_out), never forming S.

    Created at S = 0 (see the module docstring for which tensor is zero and why gradients still flow). Products run
    in fp32 (fp64 for fp64 inputs) and return in the input's dtype.
    """

    def __init__(
        self,
        structure: str,
        d_out: int,
        d_in: int,
        displacement_rank: int = 1,
        kronecker_shape: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure {structure!r}; valid: {STRUCTURES}")
        self.structure, self.d_out, self.d_in = structure, d_out, d_in
        self.size = max(d_out, d_in)  # n: the square size that circulant and LDR matrices are cropped from
        factory = {"device": device, "dtype": torch.float32}
        if structure == "circulant":
            self.first_column = nn.Parameter(torch.zeros(self.size, **factory))  # c
        elif structure == "toeplitz":
            self.diagonals = nn.Parameter(torch.zeros(d_out + d_in - 1, **factory))  # t
        elif structure == "kronecker":
            m1, n1 = resolve_kronecker_shape(d_out, d_in, kronecker_shape)
            self.kronecker_shape = (m1, n1)
            self.factor_a = nn.Parameter(torch.randn(m1, n1, **factory) / math.sqrt(n1))  # A, rows of norm ≈ 1
            self.factor_b = nn.Parameter(torch.zeros(d_out // m1, d_in // n1, **factory))  # B = 0 -> S = 0
        else:
            check_displacement_rank(displacement_rank, self.size)
            self.displacement_rank = displacement_rank
            r, n = displacement_rank, self.size
            self.circulant_columns = nn.Parameter(torch.zeros(r, n, **factory))  # g_i = 0 -> S = 0
            self.skew_columns = nn.Parameter(torch.randn(r, n, **factory) / math.sqrt(n))  # h_i, ‖h_i‖ ≈ 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _compute_dtype(x.dtype)
        v = x.to(dtype)
        if self.structure == "toeplitz":
            y = toeplitz_matvec(self.diagonals.to(dtype), v, self.d_out)
        elif self.structure == "kronecker":
            y = kronecker_matvec(self.factor_a.to(dtype), self.factor_b.to(dtype), v)
        else:
            v = F.pad(v, (0, self.size - self.d_in))  # (..., n): embed in the square size
            if self.structure == "circulant":
                y = circulant_matvec(self.first_column.to(dtype), v)
            else:
                y = ldr_matvec(self.circulant_columns.to(dtype), self.skew_columns.to(dtype), v)
            y = y[..., : self.d_out]  # crop
        return y.to(x.dtype)

    def product_cost(self) -> int:
        """Estimated multiply-adds of ``forward`` per input row, an FFT of length L counted as L·⌈log2 L⌉ (the
        layers' ``path_costs``): circulant 2F(n) + n; Toeplitz 2F(L) + L with L ≥ d_out + d_in − 1; Kronecker
        m1·n1·n2 + m1·n2·m2; LDR r·(2F(L) + L + F(n) + n) + F(n) with L ≥ 2n (r negacyclic products, one sum)."""
        fft = lambda length: length * max(1, math.ceil(math.log2(length)))  # noqa: E731
        n = self.size
        if self.structure == "circulant":
            return 2 * fft(n) + n
        if self.structure == "toeplitz":
            length = _fft_size(self.d_out + self.d_in - 1)
            return 2 * fft(length) + length
        if self.structure == "kronecker":
            (m1, n1), (m2, n2) = self.factor_a.shape, self.factor_b.shape
            return m1 * n1 * n2 + m1 * n2 * m2
        length = _fft_size(2 * n)
        return self.displacement_rank * (2 * fft(length) + length + fft(n) + n) + fft(n)

    def dense_cost(self) -> int:
        """Estimated multiply-adds of ``dense()``: d_out·d_in gathers or products, r·d_out·d_in·⌈log2 n⌉ for LDR."""
        entries = self.d_out * self.d_in
        if self.structure == "ldr":
            return self.displacement_rank * entries * max(1, math.ceil(math.log2(self.size)))
        return entries

    def dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """S as a dense d_out × d_in matrix computed in ``dtype`` (default fp32, fp64 for fp64 parameters; merges pass
        fp64), in O(r·d_out·d_in) memory, never via a larger square (circulant, Toeplitz: gathers; Kronecker:
        torch.kron; LDR: ``ldr_block``).

        For merging, and for convolutions, whose forward uses S in the kernel's shape (module docstring).
        """
        dtype = dtype or _compute_dtype(next(self.parameters()).dtype)
        if self.structure == "toeplitz":
            return toeplitz(self.diagonals.to(dtype), self.d_out, self.d_in)
        if self.structure == "kronecker":
            return torch.kron(self.factor_a.to(dtype), self.factor_b.to(dtype))
        if self.structure == "circulant":
            return circulant(self.first_column.to(dtype), self.d_out, self.d_in)
        return ldr_block(self.circulant_columns.to(dtype), self.skew_columns.to(dtype), self.d_out, self.d_in)

    def extra_repr(self) -> str:
        extra = {"kronecker": lambda: f", kronecker_shape={self.kronecker_shape}",
                 "ldr": lambda: f", displacement_rank={self.displacement_rank}"}.get(self.structure, lambda: "")()
        return f"structure={self.structure!r}, d_out={self.d_out}, d_in={self.d_in}{extra}"


# --- config ----------------------------------------------------------------------------------------------------------
LAYERS_BY_MODE: dict[str, tuple[type[nn.Module], ...]] = {
    "lora": (nn.Linear, Conv1D, *CONVOLUTIONS), "adapter": (nn.Linear, Conv1D),
}


@dataclasses.dataclass
class SURMConfig(AdapterConfig):
    """Structured unrestricted-rank adaptation of linear layers (nn.Linear, transformers Conv1D, bitsandbytes'
    quantized layers), and in mode="lora" of nn.Conv1d/2d/3d too.

    structure: "circulant" | "toeplitz" | "kronecker" | "ldr".
    displacement_rank (r): LDR only (default 1); 1 ≤ r ≤ max(d_out, d_in).
    kronecker_shape: Kronecker only; shape (m1, n1) of A in A ⊗ B; default: divisors nearest √d_out and √d_in.
    mode: "lora" (W' = W + α·S; nn.Linear and convolutions, d_in = in/groups·prod(kernel_size) for a conv) or
        "adapter" (h + f(α·S h) + b on the layer's output; linear layers only).
    alpha (α): scale of S in both modes.
    activation (f): adapter only, one of ``ACTIVATIONS`` (default "gelu"); "identity" makes the adapter mergeable.
    bias (b): adapter only (default True).
    path: "auto", or the one path each layer has: "input" on a Linear (S applied by FFT products, never formed; in
        adapter mode to the Linear's output), "weight" on a convolution (S formed at the kernel's size, one conv).
    """

    family: ClassVar[str] = "surm"
    #: values each option takes in seeded random tests (tests/test_round_trips.py; a value listed twice is drawn twice
    #: as often, and one that the config or the layer refuses leaves the option at its default)
    option_space: ClassVar[dict[str, tuple]] = dict(
        structure=STRUCTURES, mode=MODES, alpha=(-1.4, -0.8, -0.3, 0.3, 0.8, 1.4), displacement_rank=(None, 1, 2, 3),
        activation=(*ACTIVATIONS, "identity"), bias=(True, False))
    examples: ClassVar[tuple[dict, ...]] = (
        dict(structure="circulant", alpha=0.5), dict(structure="ldr", displacement_rank=2),
        dict(structure="toeplitz", mode="adapter", activation="identity"))

    structure: str = "circulant"
    displacement_rank: int | None = None
    kronecker_shape: tuple[int, int] | None = None
    mode: str = "lora"
    alpha: float = 1.0
    activation: str | None = None
    bias: bool | None = None
    path: str = "auto"

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}; valid structures: {STRUCTURES}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid modes: {MODES}")
        self.alpha = check_number("alpha", self.alpha)
        if self.alpha == 0:
            raise ValueError("alpha=0 makes α·S and every adapter gradient zero; use a non-zero alpha, e.g. 1.0")
        if self.structure == "ldr":
            if self.displacement_rank is None:
                self.displacement_rank = 1
            self.displacement_rank = check_integer("displacement_rank", self.displacement_rank)
            if self.displacement_rank < 1:
                raise ValueError(
                    f"displacement_rank must be an integer ≥ 1 (and ≤ the layer size), got {self.displacement_rank!r}"
                )
        elif self.displacement_rank is not None:
            raise ValueError(
                f"displacement_rank={self.displacement_rank} only applies to structure='ldr' (a circulant has "
                f"displacement rank 1, a Toeplitz matrix 2); drop it or use structure='ldr'."
            )
        if self.kronecker_shape is not None:
            if self.structure != "kronecker":
                raise ValueError(f"kronecker_shape only applies to structure='kronecker', not {self.structure!r}")
            if not isinstance(self.kronecker_shape, (tuple, list)) or len(self.kronecker_shape) != 2:
                raise ValueError(
                    f"kronecker_shape is the shape (rows, cols) of the first factor A, got {self.kronecker_shape!r}"
                )
            self.kronecker_shape = tuple(check_integer("kronecker_shape entries", n) for n in self.kronecker_shape)
        if self.mode == "adapter":
            self.activation = "gelu" if self.activation is None else self.activation
            self.bias = True if self.bias is None else self.bias
            if not isinstance(self.bias, bool):
                raise ValueError(f"bias must be True or False, got {self.bias!r}")
            if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
                why = " (relu'(0) = 0 would freeze a zero-initialised S)" if self.activation == "relu" else ""
                raise ValueError(f"unknown activation {self.activation!r}{why}; valid: {tuple(ACTIVATIONS)}")
        elif self.activation is not None or self.bias is not None:
            raise ValueError(
                f"activation and bias belong to mode='adapter' (got activation={self.activation!r}, "
                f"bias={self.bias!r} with mode='lora', where W' = W + α·S has neither)."
            )
        self.check_path()

    def supported_layers(self) -> tuple[type[nn.Module], ...]:
        """Per mode: ``adapt`` selects targets by it, so an adapter-mode config refuses a conv before the model is
        touched."""
        return LAYERS_BY_MODE[self.mode]

    def display_name(self) -> str:
        return f"SURMConfig(mode={self.mode!r})"  # the mode decides the supported layer types

    def check_supported(self, base_layer: nn.Module) -> None:
        if self.mode == "adapter" and isinstance(base_layer, CONVOLUTIONS):
            raise ValueError(
                f"SURMConfig(mode='adapter') adapts linear layers only, not a {type(base_layer).__name__}: the "
                "adapter h ↦ h + f(α·S h) + b acts on a Linear's output features. mode='lora' (W' = W + α·S) adapts "
                "nn.Linear, transformers Conv1D, nn.Conv1d, nn.Conv2d and nn.Conv3d."
            )
        super().check_supported(base_layer)

    def layer_class(self) -> type["SURMLayer | SURMAdapterLayer"]:
        return SURMLayer if self.mode == "lora" else SURMAdapterLayer


# --- the layers ------------------------------------------------------------------------------------------------------
class SURMLayer(AdapterLayer):
    """LoRA-style: a frozen layer with W' = W + α·S, S structured (d_out × d_in).

    Linear layers: x: (..., d_in) -> (..., d_out), y = base(x) + α·S x, S applied by FFT and never formed.
    nn.Conv1d/2d/3d: W: (out, in/groups, *k) is d_out × d_in with d_out = out, d_in = in/groups·prod(k);
    y = conv(x; W + α·S reshaped to W's shape), one conv with the base layer's settings; S is formed, at the kernel's
    size (see the module docstring for why that is cheap).
    """

    def __init__(self, base_layer: nn.Module, config: SURMConfig) -> None:
        super().__init__(base_layer, config)
        shape = base_layers.weight_shape(base_layer)  # (d_out, d_in) or (out, in/groups, *kernel_size)
        self.matrix = StructuredMatrix(
            config.structure, shape[0], math.prod(shape[1:]),
            displacement_rank=config.displacement_rank or 1, kronecker_shape=config.kronecker_shape,
            device=base_layer.weight.device,
        )
        self.check_forced_path({
            "weight": "is not a SURM path on a Linear: S is applied by FFT products and never formed",
            "input": "is not a SURM path on a convolution: S is formed at the kernel's size, one conv (docstring)",
        })

    def paths(self) -> tuple[str, ...]:
        return ("input",) if base_layers.is_linear(self.base_layer) else ("weight",)

    def path_costs(self, x_shape: Sequence[int], training: bool, input_requires_grad: bool) -> dict[str, int]:
        """Multiply-adds of one call, as in ``TensorCoreLayer.path_costs``: C₀ the base product, P the structured
        products (``StructuredMatrix.product_cost`` per row), A forming S (``dense_cost``). Linear ("input"):
        C₀ + P, training (1 + g)·C₀ + 3P; conv ("weight"): C₀ + A, training (2 + g)·C₀ + 3A (g = 1 when the input
        needs a gradient)."""
        base_cost, g = base_layers.base_cost(self.base_layer, x_shape), int(input_requires_grad)
        if self.paths() == ("input",):  # S applied to each of the rows the Linear reads
            products = base_layers.vectors(self.base_layer, x_shape)[0] * self.matrix.product_cost()
            return {"input": (1 + g) * base_cost + 3 * products if training else base_cost + products}
        assembly = self.matrix.dense_cost()
        return {"weight": (2 + g) * base_cost + 3 * assembly if training else base_cost + assembly}

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """α·S, dense, computed in ``dtype`` (``StructuredMatrix.dense``), in ``base_layers.weight_shape``: (d_out,
        d_in), or (out, in/groups, *kernel_size) for a conv."""
        return (self.config.alpha * self.matrix.dense(dtype)).reshape(base_layers.weight_shape(self.base_layer))

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.base_layer
        if self.choose_path(x) == "input":  # a linear layer: S x by FFT products
            return base(x) + self.config.alpha * self.matrix(x)
        # a conv: the kernel W + α·S, through the base conv's own call
        return base_layers.run(base, x, self.shifted_weight(_compute_dtype(base.weight.dtype)))

    def extra_repr(self) -> str:
        return f"mode='lora', alpha={self.config.alpha}, " + super().extra_repr()


class SURMAdapterLayer(AdapterLayer):
    """Adapter-style: a frozen linear layer followed by h ↦ h + f(α·S h) + b, S structured (d_out × d_out).

    Mergeable only with f = identity: then y = (I + α·S)(W x + bias) + b, i.e. W' = (I + α·S)·W and
    bias' = (I + α·S)·bias + b; unmerging solves with I + α·S. A non-linear f cannot be folded into a Linear, so
    ``merge`` raises.
    """

    def __init__(self, base_layer: nn.Module, config: SURMConfig) -> None:
        super().__init__(base_layer, config)
        d = base_layers.weight_shape(base_layer)[0]  # out_features
        device = base_layer.weight.device
        self.matrix = StructuredMatrix(
            config.structure, d, d, displacement_rank=config.displacement_rank or 1,
            kronecker_shape=config.kronecker_shape, device=device,
        )
        # named adapter_bias, not bias: code that reads ``module.bias`` must keep finding the base Linear's
        self.adapter_bias = nn.Parameter(torch.zeros(d, device=device)) if config.bias else None
        self.activation = ACTIVATIONS[config.activation]
        self.check_forced_path({"weight": "is not a path of a SURM adapter: it acts on the Linear's output h"})

    def paths(self) -> tuple[str, ...]:
        return ("input",)

    def path_costs(self, x_shape: Sequence[int], training: bool, input_requires_grad: bool) -> dict[str, int]:
        """Multiply-adds of one call: the base product C₀ and the structured products P on its output rows;
        training (1 + g)·C₀ + 3P (g = 1 when the input needs a gradient), else C₀ + P."""
        base_cost = base_layers.base_cost(self.base_layer, x_shape)
        products = base_layers.vectors(self.base_layer, x_shape)[1] * self.matrix.product_cost()  # on h's rows
        g = int(input_requires_grad)
        return {"input": (1 + g) * base_cost + 3 * products if training else base_cost + products}

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        h = self.base_layer(x)
        y = h + self.activation(self.config.alpha * self.matrix(h))
        return y if self.adapter_bias is None else y + self.adapter_bias.to(y.dtype)

    def _mixing(self, dtype: torch.dtype) -> torch.Tensor:
        """I + α·S, (d_out, d_out)."""
        if self.config.activation != "identity":
            raise ValueError(
                f"cannot merge an adapter with activation={self.config.activation!r}: h + f(α·S h) is not linear in "
                "h, so no Linear weight reproduces it. Use SURMConfig(mode='adapter', activation='identity') to merge."
            )
        if self.adapter_bias is not None and self.base_layer.bias is None:
            raise ValueError(
                "cannot merge: the adapter has a bias but the base Linear has none to absorb it "
                "(use SURMConfig(..., bias=False) or a base layer with bias=True)."
            )
        s = self.matrix.dense(dtype)
        return torch.eye(s.shape[0], dtype=dtype, device=s.device) + self.config.alpha * s

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """W' = (I + α·S)·W, bias' = (I + α·S)·bias + b in fp64, rounded once; ValueError if I + α·S is singular
        (unmerge solves with it)."""
        base, weight = self.base_layer, base_layers.weight(self.base_layer)
        dtype = merge_dtype(weight)
        mixing = self._mixing(dtype)
        if torch.linalg.lu_factor_ex(mixing).info != 0:
            raise ValueError(
                "cannot merge: I + α·S is singular, so unmerge could not recover W from (I + α·S)·W; keep this "
                "adapter unmerged (its forward is exact)"
            )
        merged = base_layers.stored(base, (mixing @ weight.to(dtype)).to(weight.dtype))
        if base.bias is not None:
            bias = mixing @ base.bias.to(dtype) + (0 if self.adapter_bias is None else self.adapter_bias.to(dtype))
            merged["bias"] = bias.to(base.bias.dtype)
        return merged

    def unmerged_weights(self) -> dict[str, torch.Tensor]:
        base, weight = self.base_layer, base_layers.weight(self.base_layer)
        dtype = merge_dtype(weight)
        mixing = self._mixing(dtype)
        restored = base_layers.stored(base, torch.linalg.solve(mixing, weight.to(dtype)).to(weight.dtype))
        if base.bias is not None:
            shifted = base.bias.to(dtype) - (0 if self.adapter_bias is None else self.adapter_bias.to(dtype))
            restored["bias"] = torch.linalg.solve(mixing, shifted).to(base.bias.dtype)
        return restored

    def extra_repr(self) -> str:
        return f"mode='adapter', activation={self.config.activation!r}, alpha={self.config.alpha}, " + super().extra_repr()
