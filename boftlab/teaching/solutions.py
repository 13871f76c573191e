"""Solutions to the exercises of notebooks 01–10, one function per exercise (``exercises.EXERCISES`` names them).

Try the exercise first: each notebook's checking cell tells you what differs and gives a hint. Then compare with the
solution here: ``boftlab.teaching.solutions.show("1.3")`` prints exercise 1.3's, from any notebook or script. A
function exercise's solution is the function the template asks for; a value exercise's solution computes the value.
``tests/test_exercises.py`` proves that every solution passes its checker.
"""

from __future__ import annotations

import inspect
import math

import torch


def show(exercise: str) -> None:
    """Print the source of exercise ``exercise``'s solution ("N.k"); raises ``ValueError`` naming the exercises if
    there is no such exercise."""
    from .exercises import EXERCISES

    if exercise not in EXERCISES:
        raise ValueError(f"there is no exercise {exercise!r}; the exercises are {', '.join(EXERCISES)}")
    print(inspect.getsource(globals()[EXERCISES[exercise].solution]))


# --- notebook 01: the primer ----------------------------------------------------------------------------------------
def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, alpha: float) -> torch.Tensor:
    """Exercise 1.1. A: (r, d), B: (n, r) -> ΔW = (α/r)·B·A, (n, d). The rank r is A's number of rows."""
    rank = lora_A.shape[0]
    return (alpha / rank) * lora_B @ lora_A


def neuron_cosines(weight: torch.Tensor) -> torch.Tensor:
    """Exercise 1.2. (n, d) -> (n, n): normalise each row to unit length, then all inner products at once."""
    unit = weight / weight.norm(dim=1, keepdim=True)
    return unit @ unit.T


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Exercise 1.3. (..., b, b) skew-symmetric S -> Q = (I − S)(I + S)⁻¹.

    Q·(I + S) = I − S, so Q solves X·(I + S) = I − S (a solve is cheaper and more accurate than an inverse).
    """
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


def neumann_terms() -> int:
    """Exercise 1.4. The fewest Neumann terms n for which cayley(S, neumann_terms=n) of ``example_skew(8, 0.5)`` is
    orthogonal to max |QᵀQ − I| < 1e-6: try n = 2, 3, … until it is."""
    from ..butterfly import cayley as boft_cayley
    from .primer import example_skew, orthogonality_error

    skew = example_skew(8, 0.5)
    return next(n for n in range(2, 50) if orthogonality_error(boft_cayley(skew, n)) < 1e-6)


# --- notebook 02: information transmission ------------------------------------------------------------------------
def butterfly_permutation(dim: int, block_size: int, factor: int) -> torch.Tensor:
    """Exercise 2.1. Index vector of P_{factor+1}: within every chunk of b·2^factor coordinates, cut into pieces of
    b/2, put the even-numbered pieces first and the odd-numbered after them."""
    if factor == 0:
        return torch.arange(dim)
    half, chunk = block_size // 2, block_size * 2**factor
    perm = []
    for start in range(0, dim, chunk):
        pieces = list(range(chunk // half))
        for piece in pieces[0::2] + pieces[1::2]:
            perm += range(start + piece * half, start + (piece + 1) * half)
    return torch.tensor(perm)


def outputs_reached(dim: int, block_size: int, n_factors: int) -> int:
    """Exercise 2.2. The first factor reaches the b outputs of one block; each later one doubles the set."""
    return min(dim, block_size * 2 ** (n_factors - 1))


def dense_butterfly_384() -> tuple[int, int]:
    """Exercise 2.3. Every (b, m) that fits d = 384 and is dense (b·2^(m−1) = 384), the one with the fewest free
    parameters m·d·(b−1)/2."""
    from ..butterfly_structure import valid_n_factors

    dim = 384
    dense = [(b, m) for b in range(2, dim + 1) for m in valid_n_factors(dim, b) if b * 2 ** (m - 1) == dim]
    return min(dense, key=lambda bm: bm[1] * dim * (bm[0] - 1) // 2)


# --- notebook 03: parameter counts ----------------------------------------------------------------------------------
def boft_layer_count(fan_in: int, fan_out: int, block_size: int, n_factors: int, scale: bool) -> int:
    """Exercise 3.1. m factors × d/b blocks × b(b−1)/2 skew entries, plus fan_out scale entries if ``scale``."""
    return n_factors * (fan_in // block_size) * block_size * (block_size - 1) // 2 + (fan_out if scale else 0)


def vit_lora_count() -> int:
    """Exercise 3.2. ViT-B/16 has 12 layers, each with a 768 × 768 query and value: 12·2·r·(768 + 768) at r = 8."""
    return 12 * 2 * 8 * (768 + 768)


def budget_choice() -> tuple[int, int]:
    """Exercise 3.3. On a 1024 × 1024 layer, among the (b, m) whose m·d·(b−1)/2 free parameters fit in LoRA r=4's
    r·(d + n) = 8192, the densest (most outputs reached, b·2^(m−1)), ties broken by fewer parameters."""
    from ..butterfly_structure import valid_n_factors

    dim, budget = 1024, 4 * (1024 + 1024)
    fits = [(b, m) for b in range(2, dim + 1) for m in valid_n_factors(dim, b) if m * dim * (b - 1) // 2 <= budget]
    return max(fits, key=lambda bm: (min(dim, bm[0] * 2 ** (bm[1] - 1)), -bm[1] * (bm[0] - 1)))


# --- notebook 04: expressivity --------------------------------------------------------------------------------------
def identity_error(rotation: torch.Tensor) -> float:
    """Exercise 4.1. ‖I − T‖_F² = tr((I − T)ᵀ(I − T)) = 2d − 2·tr(T) for orthogonal T, and ‖T‖_F² = d."""
    dim = rotation.shape[0]
    return math.sqrt(2 - 2 * rotation.trace().item() / dim)


def frontier(rows: list[dict]) -> list[dict]:
    """Exercise 4.2. Sort by budget (ties: lower error first); a row is on the front if it beats every row before it."""
    ordered = sorted(rows, key=lambda r: (r["n_params"], r["error"]))
    return [row for i, row in enumerate(ordered) if all(row["error"] < other["error"] for other in ordered[:i])]


# --- notebook 05: structured matrices -------------------------------------------------------------------------------
def displacement(matrix: torch.Tensor) -> torch.Tensor:
    """Exercise 5.1. ∇(M) = Z_1·M − M·Z_{−1}, with the shift matrices written out (O(n³), fine for a check)."""
    n = matrix.shape[0]
    z_plus = torch.diag(torch.ones(n - 1, dtype=matrix.dtype), -1)
    z_minus = z_plus.clone()
    z_plus[0, -1], z_minus[0, -1] = 1.0, -1.0
    return z_plus @ matrix - matrix @ z_minus


def circulant_matvec(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exercise 5.2. C·x = c ⊛ x = F⁻¹(F(c) ⊙ F(x)); real inputs, so the real FFT and its inverse at length n."""
    n = c.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(c) * torch.fft.rfft(x), n=n)


# --- notebook 06: tensor cores --------------------------------------------------------------------------------------
def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Exercise 6.1. Move ``mode`` to the end, multiply every fibre by the matrix (x @ Uᵀ), move it back."""
    moved = torch.movedim(tensor, mode, -1)  # (…, r_n)
    return torch.movedim(moved @ matrix.T, -1, mode)  # (…, d_n) -> back in place


def tucker_count(shape: tuple[int, ...], ranks: tuple[int, ...]) -> int:
    """Exercise 6.2. The core Π r_n plus one d_n × r_n factor per mode."""
    return math.prod(ranks) + sum(d * r for d, r in zip(shape, ranks))


# --- notebook 07: ViT fine-tuning -----------------------------------------------------------------------------------
def paired_interval(a_values: list[float], b_values: list[float]) -> tuple[float, float, float]:
    """Exercise 7.1. Per-seed values of two methods on the same seeds -> (mean, lo, hi) of a − b: the mean paired
    difference and its 95 % paired-t interval, mean ± t_{0.975, n−1}·s/√n (s: the differences' sample std)."""
    import statistics

    from ..reproduce.protocol import t_quantile

    diffs = [a - b for a, b in zip(a_values, b_values)]
    mean = statistics.fmean(diffs)
    half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


# --- notebook 08: LLM fine-tuning -----------------------------------------------------------------------------------
def chosen_rate() -> float:
    """Exercise 8.1. The rate choose_lr picks from exercise 8.1's validation table: the lowest perplexity (lower is
    better), a tie broken towards the lower rate."""
    from .exercises import VALIDATION_8_1

    best = min(VALIDATION_8_1.values())
    return min(lr for lr, perplexity in VALIDATION_8_1.items() if perplexity == best)


# --- notebook 09: diffusion fine-tuning -----------------------------------------------------------------------------
def lora_conv_count(in_channels: int, out_channels: int, kernel_size: int, rank: int) -> int:
    """Exercise 9.1. PEFT's LoRA on a k × k Conv2d: A is a (r, c_in, k, k) conv, B a 1 × 1 conv (c_out, r):
    r·(c_in·k² + c_out)."""
    return rank * (in_channels * kernel_size ** 2 + out_channels)


# --- notebook 10: speed and memory ----------------------------------------------------------------------------------
def peft_over_boftlab() -> float:
    """Exercise 10.1. In cpu-2026-11-29.md's linear table, the row d = 4096: PEFT BOFT m=2's ms per step divided by
    boftlab BOFT m=2's."""
    from ..bench import read_results, result_files

    path = next(f for f in result_files() if f.name == "cpu-2026-11-29.md")
    table = next(t for t in read_results(path) if t.suite == "linear" and "ms / step" in t.header)
    d, method, ms = (table.header.index(c) for c in ("d", "method", "ms / step"))
    times = {row[method]: row[ms] for row in table.rows if row[d] == 4096}
    return times["PEFT BOFT m=2 b=8 (block_diag patch)"] / times["boftlab BOFT m=2 b=8 [assembled]"]
