"""The butterfly structure itself: which coordinates each BOFT factor mixes, and three ways to apply the product.

R = B_m ⋯ B_1 with B_i = P_i · blockdiag(Q_i1 … Q_ik) · P_iᵀ (d × d; k = d/b blocks of size b; P_1 = I). Given the
blocks Q as a tensor (m, k, b, b), this module multiplies rows by R or Rᵀ without forming it:

* ``butterfly_apply``           the reference: m index gathers (``gather_schedule``) around m batched b × b products,
                                the formula read literally;
* ``butterfly_apply_reshaped``  the same product with reshapes only, no gathers: the layer's PyTorch path and the
                                fused kernel's plan;
* ``diagonal_blocks`` + ``block_diagonal_apply``  the assembled form. Every factor mixes only within chunks of
                                L = b·2^(m−1) coordinates, so R is block diagonal with L × L blocks: apply the factors
                                once to a (w × d) tiled identity (w a multiple of L) to read off R's w × w diagonal
                                blocks, then x @ R is one block-diagonal product, O(d·w) per row;
* ``assemble_diagonal_blocks``  the same blocks as the layer builds them on every call: one precomputed gather
                                (``assembly_index``) lays each factor's blocks out as w × w diagonal blocks, and m − 1
                                batched products multiply them — a handful of ops, whatever m, where the tiled
                                identity costs m chains of reshapes.

It imports nothing else of boftlab, so ``butterfly.py`` (the BOFT layer) and ``kernels/`` (the fused Triton kernel)
both build on it without importing each other.
"""

from __future__ import annotations

import math

import torch


def butterfly_permutation(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """Index vector ``perm`` of P_{factor+1} (``P[j, perm[j]] = 1``); factor 0 is the identity. O(d)."""
    if factor == 0:
        return torch.arange(dim)
    half = block_size // 2
    chunk = block_size * 2**factor  # coordinates one butterfly stage mixes
    pieces = torch.arange(chunk // half)
    order = torch.cat([pieces[0::2], pieces[1::2]])  # even halves first, then odd halves
    within = (order[:, None] * half + torch.arange(half)).reshape(-1)  # (chunk,)
    starts = torch.arange(0, dim, chunk)
    return (starts[:, None] + within).reshape(-1)


def gather_schedule(dim: int, block_size: int, n_factors: int, transpose: bool) -> list[torch.Tensor | None]:
    """The m+1 index gathers around the m block products of ``x @ R`` (or ``x @ Rᵀ``), adjacent ones fused.

    Row form: x @ B_i = ((x @ P_i) @ blockdiag(Q_i)) @ P_iᵀ, and for index vectors ``x @ P = x[..., inverse(perm)]``,
    ``x @ Pᵀ = x[..., perm]``. ``x @ R`` runs the factors from the last to the first, ``x @ Rᵀ`` the other way.
    Identity gathers are returned as ``None``.
    """
    perms = [butterfly_permutation(dim, block_size, i) for i in range(n_factors)]
    inverses = [torch.argsort(p) for p in perms]
    order = list(range(n_factors)) if transpose else list(range(n_factors - 1, -1, -1))
    gathers = [inverses[order[0]]]
    gathers += [perms[prev][inverses[cur]] for prev, cur in zip(order, order[1:])]  # x[a][b] == x[a[b]]
    gathers.append(perms[order[-1]])
    identity = torch.arange(dim)
    return [None if torch.equal(g, identity) else g for g in gathers]


def butterfly_apply(
    x: torch.Tensor, blocks: torch.Tensor, gathers: list[torch.Tensor | None], transpose: bool = False
) -> torch.Tensor:
    """x: (..., d) -> x @ R, or x @ Rᵀ with ``transpose``; blocks: (m, k, b, b). O(d·b·m) per row.

    ``gathers`` comes from ``gather_schedule`` for the same direction.
    """
    n_factors, n_blocks, block_size, _ = blocks.shape
    order = range(n_factors) if transpose else range(n_factors - 1, -1, -1)
    shape = x.shape
    for step, i in enumerate(order):
        if gathers[step] is not None:
            x = x[..., gathers[step]]
        q = blocks[i].transpose(-1, -2) if transpose else blocks[i]
        x = x.reshape(*shape[:-1], n_blocks, block_size)  # (..., k, b)
        x = torch.einsum("...kr,krc->...kc", x, q).reshape(shape)
    if gathers[-1] is not None:
        x = x[..., gathers[-1]]
    return x


def butterfly_apply_reshaped(x: torch.Tensor, blocks: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """x: (..., d) -> x @ R (or x @ Rᵀ); blocks: (m, k, b, b). O(d·b·m) per row, no gathers, only reshapes.

    The same result as ``butterfly_apply`` with ``gather_schedule``'s gathers. Conjugating blockdiag(Q_i) by P_i
    only changes *which* coordinates a block mixes: viewed as (d / (b·s), 2, s, b/2) with s = 2^i — [chunk, half h,
    piece c, position t] — a row has one block per (chunk, c), acting on the b coordinates (h, t), and block
    (chunk, c) is block number chunk·s + c of factor i. This is the plan of the fused kernel (``kernels/``).
    """
    n_factors, n_blocks, block_size, _ = blocks.shape
    order = range(n_factors) if transpose else range(n_factors - 1, -1, -1)
    shape, half = x.shape, block_size // 2
    for i in order:
        q = blocks[i].transpose(-1, -2) if transpose else blocks[i]  # (k, b, b)
        if i == 0:  # P_1 = I: block j mixes coordinates j·b … j·b + b − 1 (b may be odd when m = 1)
            x = torch.einsum("...kr,krc->...kc", x.reshape(*shape[:-1], n_blocks, block_size), q)
        else:
            x = x.reshape(*shape[:-1], -1, 2, 2**i, half)  # (..., chunks, h, c, t)
            x = x.transpose(-2, -3).reshape(*shape[:-1], n_blocks, block_size)  # (..., k, b): block = chunk·s + c
            x = torch.einsum("...kr,krc->...kc", x, q)
            x = x.reshape(*shape[:-1], -1, 2**i, 2, half).transpose(-2, -3)  # back to (..., chunks, h, c, t)
        x = x.reshape(shape)
    return x


def butterfly_span(block_size: int, n_factors: int) -> int:
    """L = b·2^(m−1): the chunk of coordinates R mixes, so R is block diagonal with L × L blocks. O(1)."""
    return block_size * 2 ** (n_factors - 1)


def assembled_width(dim: int, block_size: int, n_factors: int, minimum: int) -> int:
    """Width w of the diagonal blocks to assemble: the smallest multiple of L = b·2^(m−1) that divides d and is
    ≥ ``minimum`` (d when none is), so that narrow spans are grouped into blocks wide enough to multiply fast. O(d/L)."""
    span = butterfly_span(block_size, n_factors)
    return next((w for w in range(span, dim, span) if dim % w == 0 and w >= minimum), dim)


def diagonal_blocks(blocks: torch.Tensor, width: int, transpose: bool = False) -> torch.Tensor:
    """blocks: (m, k, b, b) -> R's (or Rᵀ's) diagonal blocks, (d/w, w, w). O(w·d·b·m); w a multiple of L dividing d.

    R is block diagonal with L × L blocks, hence with w × w blocks. Rows of the tiled identity E = [I_w ⋯ I_w]
    (w × d) times R: (E R)[r, j·w + c] = Σ_j' R[j'·w + r, j·w + c] = R_j[r, c], only j' = j being non-zero.
    Differentiable in ``blocks``.
    """
    n_factors, n_blocks, block_size, _ = blocks.shape
    dim = n_blocks * block_size
    tiled = torch.eye(width, dtype=blocks.dtype, device=blocks.device).repeat(1, dim // width)  # (w, d)
    rows = butterfly_apply_reshaped(tiled, blocks)  # E R, (w, d)
    diagonal = rows.reshape(width, dim // width, width).transpose(0, 1)  # (d/w, w, w): [j, r, c] = R_j[r, c]
    return diagonal.transpose(-1, -2) if transpose else diagonal


def assembly_index(block_size: int, n_factors: int, width: int) -> torch.Tensor:
    """(m, w, w) int64: where each entry of every factor's w × w diagonal blocks comes from, for
    ``assemble_diagonal_blocks``. O(m·w²·b), once per layer.

    A chunk of w coordinates (w a multiple of L) meets w/b consecutive blocks of every factor, the same way in every
    chunk. Entry [i, r, c] is i·(w·b + 1) + p: p = 0 for a structural zero of B_i, else 1 + the position of that
    entry among the chunk's w/b blocks of factor i, flattened (k', b, b). Read off B_i's dense w × w block with
    numbered blocks in factor i and identities elsewhere (exact in fp64).
    """
    per_chunk = width * block_size  # (w/b) blocks of b × b
    index = []
    for i in range(n_factors):
        numbered = torch.eye(block_size, dtype=torch.float64).repeat(i + 1, width // block_size, 1, 1)
        numbered[i] = torch.arange(1, per_chunk + 1, dtype=torch.float64).reshape(-1, block_size, block_size)
        dense = butterfly_apply_reshaped(torch.eye(width, dtype=torch.float64), numbered)  # (w, w): B_i on a chunk
        index.append(dense.round().long() + i * (per_chunk + 1))
    return torch.stack(index)


def assemble_diagonal_blocks(blocks: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """blocks: (m, k, b, b) -> R's diagonal blocks (d/w, w, w), as ``diagonal_blocks``; ``index`` from
    ``assembly_index``. One gather for every factor's w × w blocks, then m − 1 batched products:
    R_j = B_m,j ⋯ B_1,j. O(d·w²·(m − 1)); differentiable in ``blocks``."""
    n_factors, _, block_size, _ = blocks.shape
    width = index.shape[-1]
    chunks = blocks.reshape(n_factors, -1, width * block_size).transpose(0, 1)  # (d/w, m, w·b): a chunk's blocks
    padded = torch.nn.functional.pad(chunks, (1, 0)).reshape(len(chunks), -1)  # (d/w, m·(w·b + 1)): 0 before each
    # m × (d/w, w, w): B_i's diagonal blocks (index_select: a plain gather, several times faster than x[:, index])
    factors = padded.index_select(1, index.reshape(-1)).reshape(len(chunks), n_factors, width, width).unbind(1)
    product = factors[-1]
    for factor in reversed(factors[:-1]):  # x @ R = x @ B_m ⋯ B_1
        product = torch.bmm(product, factor)
    return product


def block_diagonal_apply(x: torch.Tensor, diagonal: torch.Tensor) -> torch.Tensor:
    """x: (..., d) -> x @ blockdiag(D_1 … D_j); diagonal: (j, w, w) with j·w = d. O(d·w) per row, one batched product."""
    n_diagonal, width, _ = diagonal.shape
    shape = x.shape
    rows = x.reshape(-1, n_diagonal, width).transpose(0, 1)  # (j, N, w): row n's j-th piece
    return torch.bmm(rows, diagonal).transpose(0, 1).reshape(shape)


def valid_block_sizes(dim: int, n_factors: int) -> list[int]:
    """Block sizes b ≥ 2 for which b·2^(m−1) divides d (and b is even when m > 1, so P_i can halve blocks)."""
    step = 2 ** (n_factors - 1)
    return [b for b in range(2, dim + 1) if dim % (b * step) == 0 and (n_factors == 1 or b % 2 == 0)]


def valid_n_factors(dim: int, block_size: int) -> list[int]:
    """Numbers of factors m that fit (d, b); the largest, log2(d/b)+1 when d/b is a power of two, makes R dense."""
    if dim % block_size:
        return []
    if block_size % 2:
        return [1]
    k = dim // block_size
    return [m for m in range(1, int(math.log2(k)) + 2) if k % 2 ** (m - 1) == 0]
