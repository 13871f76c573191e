"""A fused Triton kernel for the butterfly-orthogonal transform: x @ R (or x @ Rᵀ) with R = B_m ⋯ B_1.

The PyTorch factored form (``boftlab.butterfly_structure.butterfly_apply_reshaped``, which is also this kernel's
plan) runs m rounds of reshape + batched b × b matmul, each reading and writing all activations (several passes over
memory per factor, plus m saved intermediates for backward). Here one Triton program loads a tile of rows once,
applies every factor to it on chip, and writes it once. The assembled form (R's diagonal blocks, then one batched
matmul) needs no kernel of its own: it is a batched matmul; this kernel serves the factored form, which stays the
cheaper one when L = b·2^(m−1) is wide, and is priced against the assembled form by ``ButterflyRotation.costs``.

Why no gathers are needed. Factor i (0-based, s = 2^i) is P · blockdiag(Q_i) · Pᵀ, and conjugating by the
butterfly permutation only changes *which* coordinates a block mixes: in the natural layout, a row viewed as

    (d / (b·s), 2, s, b/2)        [chunk, half of the chunk h, piece c, position t]

has one block per (chunk, c), acting on the b coordinates (h, t): b/2 from each half of a chunk of b·s coordinates,
s·b/2 apart, like one Cooley–Tukey stage. Block (chunk, c) is block number chunk·s + c of factor i. So
a factor is a reshape/transpose of the tile, a batched (rows × b) · (b × b) product, and the inverse reshape: all in
registers. Every factor mixes only within chunks of L = b·2^(m−1) coordinates, so R is block diagonal with L × L
blocks and a program needs only a (rows × L·j) tile, never the whole row.

Precision: tiles are loaded to fp32, stay fp32 between factors, and every product accumulates in fp32. For b < 16
the product is a broadcast multiply-and-sum; for b ≥ 16 it is ``tl.dot`` (GPU dot tiles must be ≥ 16), with
input_precision="ieee" for fp32 inputs (no silent TF32) and "tf32" for bf16/fp16 inputs — TF32 keeps 10 mantissa
bits, as many as fp16 and more than bf16, so it is never coarser than the PyTorch path's 16-bit matmuls.

Backward: one kernel per tile recomputes the factor inputs from x (no intermediates are stored, so training keeps
only x), propagates the gradient back through the factors (that is dx), and accumulates each block's gradient
xₜᵀ·gₜ₊₁ over the rows a program owns; per-program partial sums are then added by PyTorch (deterministic).

What it does not do: its tile shapes come from register budgets (``tile_shape``), not from tuning runs;
recomputation makes the backward O(m²) in factor products, which is compute-bound for large b·m; tiles of
L·b > 16384 elements (e.g. b = 8 with m ≥ 10) do not fit on chip and are left to the PyTorch path.
"""

from __future__ import annotations

import math

import torch

from .switch import KERNEL_ENV, FusedKernelError

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch path still works; only the kernel is unavailable
    triton = None

BLOCK_SIZES = (2, 4, 8, 16, 32, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SPAN_ELEMENTS = 16384  # L·b: one factor's blocks for one tile of L columns, in registers
_PRODUCT_BUDGET = 4096  # rows × cols × b elements of a broadcast product, per program
_DOT_MIN = 16  # tl.dot on GPUs needs every tile dimension ≥ 16


# --- what the kernel supports --------------------------------------------------------------------------------------
def unsupported_reason(dim: int, block_size: int, n_factors: int, dtype: torch.dtype) -> str | None:
    """Why the fused kernel cannot run this shape, or None if it can."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported; supported dtypes: {list(DTYPES)}"
    if block_size not in BLOCK_SIZES:
        return f"block_size={block_size} is not supported; supported block sizes: {list(BLOCK_SIZES)}"
    span = block_size * 2 ** (n_factors - 1)
    if n_factors < 1 or dim % span:
        return f"n_factors={n_factors} with block_size={block_size} needs d divisible by {span}, got d={dim}"
    if span * block_size > MAX_SPAN_ELEMENTS:
        largest = max(m for m in range(1, n_factors) if block_size**2 * 2 ** (m - 1) <= MAX_SPAN_ELEMENTS)
        return (
            f"block_size·2^(n_factors−1)·block_size = {span * block_size} > {MAX_SPAN_ELEMENTS}: the tile does not "
            f"fit on chip; the largest supported n_factors for block_size={block_size} is {largest}"
        )
    return None


def fused_supported(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """Whether ``butterfly_apply_fused`` runs here: CUDA tensors, Triton importable, supported b, m, d and dtype."""
    if triton is None or not (x.is_cuda and blocks.is_cuda) or x.device != blocks.device or blocks.dim() != 4:
        return False
    n_factors, n_blocks, block_size, _ = blocks.shape
    if x.shape[-1] != n_blocks * block_size or blocks.dtype not in DTYPES:
        return False
    return unsupported_reason(x.shape[-1], block_size, n_factors, x.dtype) is None


def tile_shape(dim: int, block_size: int, n_factors: int) -> tuple[int, int, bool]:
    """(rows, cols, use_dot) of one program's tile: cols a multiple of L = b·2^(m−1) dividing d; rows a power of 2.

    Sized so one program stays near ≤ 128 registers per thread at 4 warps (broadcast products of ≤ 4096 elements,
    dot tiles of ≤ 32 × 64; benchmarks/README.md): wide enough for coalesced rows, small enough to keep several
    programs resident per SM.
    """
    use_dot = block_size >= _DOT_MIN
    cols = block_size * 2 ** (n_factors - 1)
    while cols < (64 if use_dot else 128) and dim % (2 * cols) == 0:
        cols *= 2
    if use_dot:
        rows = _DOT_MIN if cols > 64 else 2 * _DOT_MIN
    else:
        rows = max(1, min(64, 2 ** int(math.log2(max(1, _PRODUCT_BUDGET // (cols * block_size))))))
    return rows, cols, use_dot


# --- the kernels ---------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _to_blocks(x, ROWS: tl.constexpr, COLS: tl.constexpr, B: tl.constexpr, S: tl.constexpr):
        """(rows, cols) -> (rows, cols/b, b): each b-vector one block of the factor with stride s."""
        x = tl.reshape(x, (ROWS * COLS // (B * S), 2, S, B // 2))  # (rows·chunks, h, c, t)
        x = tl.permute(x, (0, 2, 1, 3))  # (rows·chunks, c, h, t)
        return tl.reshape(x, (ROWS, COLS // B, B))

    @triton.jit
    def _from_blocks(x, ROWS: tl.constexpr, COLS: tl.constexpr, B: tl.constexpr, S: tl.constexpr):
        """The inverse of ``_to_blocks``."""
        x = tl.reshape(x, (ROWS * COLS // (B * S), S, 2, B // 2))
        x = tl.permute(x, (0, 2, 1, 3))
        return tl.reshape(x, (ROWS, COLS))

    @triton.jit
    def _load_blocks(q_ptr, factor, block0, n_blocks, G: tl.constexpr, B: tl.constexpr, FLIP: tl.constexpr):
        """(G, b, b) fp32: blocks block0 … block0+G−1 of ``factor``, each transposed when FLIP."""
        g = tl.arange(0, G)[:, None, None]
        r = tl.arange(0, B)[None, :, None]
        c = tl.arange(0, B)[None, None, :]
        inner = c * B + r if FLIP else r * B + c
        return tl.load(q_ptr + (factor * n_blocks + block0 + g) * (B * B) + inner).to(tl.float32)

    @triton.jit
    def _block_product(x, q, DOT: tl.constexpr, PRECISION: tl.constexpr):
        """(rows, G, b) · (G, b, b) -> (rows, G, b), one b × b product per block, fp32 accumulation."""
        if DOT:
            y = tl.dot(tl.permute(x, (1, 0, 2)), q, input_precision=PRECISION)  # (G, rows, b)
            return tl.permute(y, (1, 0, 2))
        else:
            return tl.sum(x[:, :, :, None] * q[None, :, :, :], axis=2)

    @triton.jit
    def _block_outer(x, g, DOT: tl.constexpr, PRECISION: tl.constexpr):
        """(rows, G, b), (rows, G, b) -> (G, b, b): Σ_rows xᵀ g per block, fp32."""
        if DOT:
            return tl.dot(tl.permute(x, (1, 2, 0)), tl.permute(g, (1, 0, 2)), input_precision=PRECISION)
        else:
            return tl.sum(x[:, :, :, None] * g[:, :, None, :], axis=0)

    @triton.jit
    def _step(x, q_ptr, step: tl.constexpr, block0, n_blocks, M: tl.constexpr, B: tl.constexpr,
              TRANSPOSE: tl.constexpr, FLIP: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
              DOT: tl.constexpr, PRECISION: tl.constexpr):
        """Apply step ``step`` of x @ R (factors m−1 … 0) or x @ Rᵀ (factors 0 … m−1, blocks transposed)."""
        factor: tl.constexpr = step if TRANSPOSE else M - 1 - step
        q = _load_blocks(q_ptr, factor, block0, n_blocks, COLS // B, B, TRANSPOSE != FLIP)
        xb = _to_blocks(x, ROWS, COLS, B, 1 << factor)
        return _from_blocks(_block_product(xb, q, DOT, PRECISION), ROWS, COLS, B, 1 << factor)

    @triton.jit
    def _step_backward(x, grad, acc, q_ptr, step: tl.constexpr, block0, n_blocks, M: tl.constexpr,
                       M_POW2: tl.constexpr, B: tl.constexpr, TRANSPOSE: tl.constexpr, ROWS: tl.constexpr,
                       COLS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
        """Back through step t: acc[t] += xₜᵀ gₜ₊₁ per block, and gₜ = gₜ₊₁ Aₜᵀ; xₜ recomputed from x = x₀."""
        factor: tl.constexpr = step if TRANSPOSE else M - 1 - step
        xt = x
        for earlier in tl.static_range(step):
            xt = _step(xt, q_ptr, earlier, block0, n_blocks, M, B, TRANSPOSE, False, ROWS, COLS, DOT, PRECISION)
        gb = _to_blocks(grad, ROWS, COLS, B, 1 << factor)
        outer = _block_outer(_to_blocks(xt, ROWS, COLS, B, 1 << factor), gb, DOT, PRECISION)  # (G, b, b)
        which = tl.arange(0, M_POW2)[:, None, None, None]
        acc += tl.where(which == step, outer[None, :, :, :], 0.0)
        q = _load_blocks(q_ptr, factor, block0, n_blocks, COLS // B, B, not TRANSPOSE)  # Aₜᵀ
        return _from_blocks(_block_product(gb, q, DOT, PRECISION), ROWS, COLS, B, 1 << factor), acc

    @triton.jit
    def _forward_kernel(x_ptr, q_ptr, y_ptr, n_rows, dim, n_blocks,
                        B: tl.constexpr, M: tl.constexpr, TRANSPOSE: tl.constexpr,
                        ROWS: tl.constexpr, COLS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
        """y = x @ R (or Rᵀ) for a (ROWS, COLS) tile: one load, m factor products in registers, one store."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
        mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        block0 = tl.program_id(1) * (COLS // B)
        for step in tl.static_range(M):
            x = _step(x, q_ptr, step, block0, n_blocks, M, B, TRANSPOSE, False, ROWS, COLS, DOT, PRECISION)
        tl.store(y_ptr + offsets, x.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward_kernel(x_ptr, dy_ptr, q_ptr, dx_ptr, dq_ptr, n_rows, dim, n_blocks, tiles_per_program,
                         B: tl.constexpr, M: tl.constexpr, M_POW2: tl.constexpr, TRANSPOSE: tl.constexpr,
                         ROWS: tl.constexpr, COLS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                         WRITE_DX: tl.constexpr):
        """dx = dy @ (R or Rᵀ)ᵀ and this program's partial sum of every block gradient, for its row tiles.

        Step t maps xₜ to xₜ₊₁ = xₜ Aₜ (Aₜ block diagonal); going back, dAₜ = xₜᵀ gₜ₊₁ per block and gₜ = gₜ₊₁ Aₜᵀ.
        xₜ is recomputed from x (registers hold one tile, not m). The m accumulators share one (m, G, b, b) tensor.
        """
        G: tl.constexpr = COLS // B
        block0 = tl.program_id(1) * G
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        acc = tl.zeros((M_POW2, G, B, B), tl.float32)
        for tile in range(tiles_per_program):
            rows = (tl.program_id(0) * tiles_per_program + tile) * ROWS + tl.arange(0, ROWS)
            offsets = rows.to(tl.int64)[:, None] * dim + cols[None, :]
            mask = (rows < n_rows)[:, None] & (cols < dim)[None, :]
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            for step in tl.static_range(M - 1, -1, -1):
                grad, acc = _step_backward(x, grad, acc, q_ptr, step, block0, n_blocks, M, M_POW2, B, TRANSPOSE,
                                           ROWS, COLS, DOT, PRECISION)
            if WRITE_DX:
                tl.store(dx_ptr + offsets, grad.to(dx_ptr.dtype.element_ty), mask=mask)
        # step t used Q_f (x @ R: f = m−1−t) or Q_fᵀ (x @ Rᵀ: f = t): write dQ_f = dAₜ or dAₜᵀ
        step_ = tl.arange(0, M_POW2)[:, None, None, None]
        factor_ = step_ if TRANSPOSE else M - 1 - step_
        g = tl.arange(0, G)[None, :, None, None]
        r = tl.arange(0, B)[None, None, :, None]
        c = tl.arange(0, B)[None, None, None, :]
        inner = c * B + r if TRANSPOSE else r * B + c
        target = ((tl.program_id(0) * M + factor_) * n_blocks + block0 + g) * (B * B) + inner
        tl.store(dq_ptr + target, acc, mask=(step_ < M) & (g < G) & (r < B) & (c < B))


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 for fp32 activations, TF32 (≥ the inputs' own precision) for 16-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _forward_constants(dim: int, block_size: int, n_factors: int, transpose: bool,
                       dtype: torch.dtype) -> dict[str, object]:
    """The constexpr arguments of ``_forward_kernel`` for this shape and dtype (a launch and ``compile_ahead``)."""
    rows, cols, dot = tile_shape(dim, block_size, n_factors)
    return dict(B=block_size, M=n_factors, TRANSPOSE=transpose, ROWS=rows, COLS=cols, DOT=dot,
                PRECISION=_precision(dtype))


def _backward_constants(dim: int, block_size: int, n_factors: int, transpose: bool, dtype: torch.dtype,
                        write_dx: bool) -> dict[str, object]:
    """The constexpr arguments of ``_backward_kernel``: the forward's tile, halved in rows on the broadcast path (the
    backward holds x, the gradient and m accumulators in registers)."""
    rows, cols, dot = tile_shape(dim, block_size, n_factors)
    return dict(B=block_size, M=n_factors, M_POW2=1 << (n_factors - 1).bit_length(), TRANSPOSE=transpose,
                ROWS=rows if dot else max(1, rows // 2), COLS=cols, DOT=dot, PRECISION=_precision(dtype),
                WRITE_DX=write_dx)


def _run(kernel, grid: tuple[int, ...], *args, **constants) -> None:
    """Launch ``kernel`` on ``grid``; a compile, launch or driver failure becomes a ``FusedKernelError`` that names the
    switch to the PyTorch path — never a silent fallback."""
    try:
        kernel[grid](*args, **constants)
    except Exception as error:
        raise FusedKernelError(
            f"the fused Triton butterfly kernel failed ({type(error).__name__}: {error}). To use the PyTorch path "
            f"instead, build the layers with BOFTConfig(kernel='torch') or with the environment variable "
            f"{KERNEL_ENV}=torch set."
        ) from error


def _launch_forward(x: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    n_factors, n_blocks, block_size, _ = blocks.shape
    n_rows, dim = x.shape
    y = torch.empty_like(x)
    if n_rows == 0:
        return y
    constants = _forward_constants(dim, block_size, n_factors, transpose, x.dtype)
    grid = (triton.cdiv(n_rows, constants["ROWS"]), dim // constants["COLS"])
    _run(_forward_kernel, grid, x, blocks, y, n_rows, dim, n_blocks, **constants)
    return y


def _launch_backward(
    x: torch.Tensor, grad: torch.Tensor, blocks: torch.Tensor, transpose: bool, write_dx: bool
) -> tuple[torch.Tensor | None, torch.Tensor]:
    n_factors, n_blocks, block_size, _ = blocks.shape
    n_rows, dim = x.shape
    constants = _backward_constants(dim, block_size, n_factors, transpose, x.dtype, write_dx)
    n_col_tiles, n_row_tiles = dim // constants["COLS"], max(1, triton.cdiv(n_rows, constants["ROWS"]))
    # enough programs to fill the GPU; each loops over its row tiles and keeps one partial sum per block
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    n_programs = max(1, min(n_row_tiles, target // n_col_tiles))
    tiles_per_program = triton.cdiv(n_row_tiles, n_programs)
    n_programs = triton.cdiv(n_row_tiles, tiles_per_program)
    dx = torch.empty_like(x) if write_dx else x  # x as a placeholder pointer, never written
    partial = torch.empty(n_programs, n_factors, n_blocks, block_size, block_size, device=x.device,
                          dtype=torch.float32)
    _run(_backward_kernel, (n_programs, n_col_tiles),
         x, grad, blocks, dx, partial, n_rows, dim, n_blocks, tiles_per_program, **constants)
    return (dx if write_dx else None), partial.sum(0).to(blocks.dtype)


class _FusedButterfly(torch.autograd.Function):
    """y = x @ R (or Rᵀ) on (n, d) rows; saves only x and the blocks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
        x, blocks = x.contiguous(), blocks.contiguous()
        ctx.save_for_backward(x, blocks)
        ctx.transpose = transpose
        return _launch_forward(x, blocks, transpose)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, blocks = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.needs_input_grad[1]:
            dx, dblocks = _launch_backward(x, grad, blocks, ctx.transpose, ctx.needs_input_grad[0])
            return dx, dblocks, None
        # dy @ (x's map)ᵀ: R ↔ Rᵀ is the same kernel in the other direction
        return _launch_forward(grad, blocks, not ctx.transpose), None, None


# --- the entry point -----------------------------------------------------------------------------------------------
def butterfly_apply_fused(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x: (..., d) -> x @ R, or x @ Rᵀ with ``transpose``; blocks: (m, k, b, b). O(d·b·m) per row, one pass.

    The same result (to fp tolerance) as ``butterfly_structure.butterfly_apply_reshaped``, its plan: the kernel
    implements the butterfly permutations by reshapes, so it takes no gathers. Differentiable in x and blocks.
    ``FusedKernelError`` if the kernel fails to compile or launch.
    """
    if triton is None:
        raise RuntimeError("butterfly_apply_fused needs Triton (pip install triton); use butterfly_apply_reshaped")
    if blocks.dim() != 4 or blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError(f"blocks must have shape (n_factors, n_blocks, b, b), got {tuple(blocks.shape)}")
    n_factors, n_blocks, block_size, _ = blocks.shape
    dim = x.shape[-1]
    if dim != n_blocks * block_size:
        raise ValueError(f"x has d={dim} features but blocks cover n_blocks·b = {n_blocks}·{block_size}")
    reason = unsupported_reason(dim, block_size, n_factors, x.dtype)
    if reason is not None:
        raise ValueError(f"the fused butterfly kernel cannot run this case: {reason}. Use butterfly_apply_reshaped.")
    if x.device != blocks.device:
        raise ValueError(f"x is on {x.device} but blocks are on {blocks.device}")
    y = _FusedButterfly.apply(x.reshape(-1, dim), blocks, bool(transpose))
    return y.reshape(x.shape)


# --- ahead-of-time compilation (no GPU needed) ---------------------------------------------------------------------
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_ahead(capability: int, dim: int, block_size: int, n_factors: int, dtype: torch.dtype,
                  transpose: bool = False, write_dx: tuple[bool, ...] = (True, False)) -> list:
    """Compile the forward kernel and the backward kernel (with dx, without dx, or both: ``write_dx``) for an NVIDIA
    GPU of compute capability ``capability`` (75: T4, 80: A100, 90: H100) on any machine, GPU or not.

    ``triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", capability, 32))`` with
    the constants a launch on that shape uses and the specialisation a launch sees for 16-byte aligned torch tensors
    (and d divisible by 16, when it is). Raises what Triton raises on a compile error; returns the compiled kernels.
    """
    if triton is None:
        raise RuntimeError("compile_ahead needs Triton (pip install triton)")
    reason = unsupported_reason(dim, block_size, n_factors, dtype)
    if reason is not None:
        raise ValueError(f"the fused butterfly kernel does not support this case: {reason}")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    pointer = "*" + TRITON_TYPES[dtype]
    divisible = [["tt.divisibility", 16]]

    def build(kernel, types: dict[str, str], constants: dict[str, object]):
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        aligned = [name for name, t in types.items() if t.startswith("*")] + (["dim"] if dim % 16 == 0 else [])
        attrs = {(kernel.arg_names.index(name),): divisible for name in aligned}
        source = ASTSource(kernel, signature, constants, attrs)
        return triton.compile(source, target=GPUTarget("cuda", capability, 32))

    sizes = {"n_rows": "i32", "dim": "i32", "n_blocks": "i32"}
    compiled = [build(_forward_kernel, {"x_ptr": pointer, "q_ptr": pointer, "y_ptr": pointer, **sizes},
                      _forward_constants(dim, block_size, n_factors, transpose, dtype))]
    for dx in write_dx:
        types = {"x_ptr": pointer, "dy_ptr": pointer, "q_ptr": pointer, "dx_ptr": pointer, "dq_ptr": "*fp32",
                 **sizes, "tiles_per_program": "i32"}
        compiled.append(build(_backward_kernel, types,
                              _backward_constants(dim, block_size, n_factors, transpose, dtype, dx)))
    return compiled
