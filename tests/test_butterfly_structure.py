"""The butterfly structure (boftlab.butterfly_structure): permutations, the gather schedule, the two ways to apply R,
and the module's place as a leaf that both the BOFT layer and the fused kernel import."""

import ast
from pathlib import Path

import pytest
import torch

from boftlab.butterfly import cayley, skew_symmetric
from boftlab.butterfly_structure import (
    assemble_diagonal_blocks,
    assembled_width,
    assembly_index,
    block_diagonal_apply,
    butterfly_apply,
    butterfly_apply_reshaped,
    butterfly_permutation,
    diagonal_blocks,
    gather_schedule,
    valid_block_sizes,
)

PACKAGE = Path(__file__).resolve().parents[1] / "boftlab"
# (d, b, m): OFT, BOFT, d not a power of two, the densest m for b = 2 and b = 8, large blocks
CASES = [(16, 2, 1), (32, 4, 2), (48, 4, 2), (64, 8, 3), (32, 8, 3), (64, 2, 6), (64, 16, 2), (64, 32, 2), (64, 64, 1)]
IDS = [f"d{d}-b{b}-m{m}" for d, b, m in CASES]


def random_blocks(d: int, b: int, m: int, seed: int = 0) -> torch.Tensor:
    """(m, d/b, b, b) orthogonal blocks far from the identity, so every factor matters."""
    generator = torch.Generator().manual_seed(seed)
    return cayley(skew_symmetric(torch.randn(m, d // b, b * (b - 1) // 2, generator=generator), b))


def test_permutations_match_peft():
    from peft.tuners.boft.layer import BOFTLayer

    for d, b, m in [(16, 2, 4), (32, 4, 3), (24, 4, 2), (64, 8, 4), (48, 6, 2)]:
        for i in range(m):
            theirs = BOFTLayer.block_butterfly_perm(None, d, d // b // 2**i, b // 2, m - 1)
            assert torch.equal(theirs, butterfly_permutation(d, b, i)), (d, b, m, i)


def test_first_factor_is_block_diagonal():
    assert torch.equal(butterfly_permutation(32, 4, 0), torch.arange(32))


def test_valid_block_sizes():
    assert valid_block_sizes(48, 1) == [2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert valid_block_sizes(48, 3) == [2, 4, 6, 12]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d, b, m", CASES, ids=IDS)
def test_reshaped_plan_equals_gathered_path(d, b, m, transpose):
    x, blocks = torch.randn(3, d), random_blocks(d, b, m)
    expected = butterfly_apply(x, blocks, gather_schedule(d, b, m, transpose), transpose)
    torch.testing.assert_close(butterfly_apply_reshaped(x, blocks, transpose), expected)


@pytest.mark.parametrize("d, b, m", CASES, ids=IDS)
def test_gathered_diagonal_blocks_equal_the_tiled_identity_fp64(d, b, m):
    """The layer's assembly (one gather, m − 1 batched products) gives the diagonal blocks that the tiled identity
    reads off, and x @ blockdiag(them) is x @ R, in fp64 (a float64 gather copies values exactly)."""
    blocks = random_blocks(d, b, m).double()
    for width in {assembled_width(d, b, m, 16), b * 2 ** (m - 1), d}:
        index = assembly_index(b, m, width)
        assert index.shape == (m, width, width) and index.dtype == torch.long
        gathered = assemble_diagonal_blocks(blocks, index)
        torch.testing.assert_close(gathered, diagonal_blocks(blocks, width), rtol=0, atol=1e-14)
        x = torch.randn(5, d, dtype=torch.float64)
        torch.testing.assert_close(block_diagonal_apply(x, gathered), butterfly_apply_reshaped(x, blocks),
                                   rtol=0, atol=1e-13)


def test_assembly_index_reads_every_block_entry_once_per_factor():
    """Each factor's w × w blocks take every entry of the chunk's w/b blocks exactly once; the rest are zeros."""
    index = assembly_index(4, 3, 16)  # L = 16: one chunk of 4 blocks per factor
    for i, factor in enumerate(index):
        values = factor - i * (16 * 4 + 1)
        assert sorted(values[values > 0].tolist()) == list(range(1, 16 * 4 + 1))
        assert (values == 0).sum() == 16 * 16 - 16 * 4


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, relative imports written with their leading dots."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append("." * node.level + (node.module or ""))
    return found


def test_structure_is_a_leaf_and_the_kernel_does_not_import_the_layer():
    """No import cycle: butterfly_structure imports nothing of boftlab; kernels/ imports the structure, never
    butterfly.py (which imports kernels/)."""
    assert not [m for m in _imports(PACKAGE / "butterfly_structure.py") if m.startswith((".", "boftlab"))]
    for path in (PACKAGE / "kernels").glob("*.py"):
        assert not [m for m in _imports(path) if m in ("..butterfly", "boftlab.butterfly")], path
