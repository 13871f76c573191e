"""Checkers for the exercises of notebooks 01–10: each compares a student's answer with boftlab and explains.

Every exercise is a markdown heading "Exercise N.k — …" in its notebook, a template cell (a function whose body
raises ``NotImplementedError``, or a value left as ``...``) and a checking cell ``check("N.k", answer)``. A checker
returns a ``Result`` (``.passed``, ``.message``) and never raises: an unfilled template reads "not attempted yet",
an exception in the student's code is reported with its type and message, a wrong answer with what was expected, what
differs and a hint. A number may come as a NumPy scalar, a one-element tensor or list, a tensor as a list or NumPy
array: it is converted, and the verdict says so; NaN, ±inf and complex values are wrong answers. Solutions:
``boftlab.teaching.solutions`` (one function per exercise, named in ``EXERCISES``). ``tests/test_exercises.py``
proves that every solution passes and every notebook's blank template does not.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Callable

import torch


@dataclasses.dataclass(frozen=True)
class Result:
    """What a checker found: ``passed``, and a message for the student (what was expected, what differs, a hint)."""

    exercise: str
    passed: bool
    message: str

    def __repr__(self) -> str:
        status = "passed" if self.passed else "not passed yet"
        return f"Exercise {self.exercise} — {status}. {self.message}"


@dataclasses.dataclass(frozen=True)
class Exercise:
    """One exercise: its id "N.k", title, notebook, checker, the name of its solution in ``solutions`` and whether the
    answer is a function or a value (a value exercise's solution function computes the value)."""

    id: str
    title: str
    notebook: str
    checker: Callable[[Any], Result]
    solution: str
    answer: str  # "function" | "value"


EXERCISES: dict[str, Exercise] = {}


class _Wrong(Exception):
    """Raised inside a checker body: the answer is wrong; the text is the message."""


def _checker(exercise: str, title: str, notebook: str, solution: str, answer: str = "function"):
    """Register a checker body ``(answer) -> success message`` that raises ``_Wrong`` with the failure message; the
    wrapper turns an unfilled template, a student's exception or a wrong answer into a failed ``Result``."""

    def register(body: Callable[[Any], str]) -> Callable[[Any], Result]:
        @functools.wraps(body)
        def check_answer(student: Any) -> Result:
            if student is ...:
                return Result(exercise, False, "Not attempted yet: replace the `...` in the template cell with your answer.")
            _NOTES.clear()
            try:
                return Result(exercise, True, body(student) + _noted())
            except NotImplementedError:
                return Result(exercise, False, "Not attempted yet: the template still raises NotImplementedError; write "
                                               "the function body and run the template cell again.")
            except _Wrong as wrong:
                return Result(exercise, False, str(wrong) + _noted())
            except Exception as err:  # the student's code failed: report it, never raise in the notebook
                return Result(exercise, False, f"Your code raised {type(err).__name__}: {err}{_where(err)}.")

        EXERCISES[exercise] = Exercise(exercise, title, notebook, check_answer, solution, answer)
        return check_answer

    return register


def _where(err: Exception) -> str:
    """Where in the student's code ``err`` was raised: the last traceback frame that is neither boftlab's nor
    torch's (a notebook cell, the student's file), as " (in <function>, line N: <source line>)"; empty if none."""
    import linecache
    import traceback

    package = str(Path(__file__).resolve().parents[1])
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if not f.filename.startswith(package) and f"{os.sep}torch{os.sep}" not in f.filename]
    if not frames:
        return ""
    frame = frames[-1]
    line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
    return f" (in {frame.name}, line {frame.lineno}: {line})" if line else f" (in {frame.name}, line {frame.lineno})"


#: each exercise's hints, from a nudge to the method in words — never the code. ``check`` gives the first on the
#: first failed try and one more on each later try (a student version gives the first only: ``hints="first"``).
HINTS: dict[str, tuple[str, ...]] = {
    "1.1": ("ΔW has the shape of W, d_out × d_in: which product of B (d_out × r) and A (r × d_in) has that shape?",
            "The rank r is not an argument: read it from A's shape. The scale is α divided by r.",
            "Multiply B by A, in that order, and scale the product by α/r, with r the number of rows of A."),
    "1.2": ("A neuron is a row of W; the cosine of two vectors is their inner product divided by both norms.",
            "Normalise every row to unit length first (divide by its norm, keeping the dimension so it broadcasts).",
            "With the unit rows as a matrix U, all cosines at once are the inner products of rows: U times U "
            "transposed."),
    "1.3": ("Q = (I − S)(I + S)⁻¹ needs an identity of S's size and batch shape, and a way to apply the inverse.",
            "Rather than inverting I + S, solve a linear system: Q·(I + S) = I − S, with the unknown on the left of "
            "the matrix; torch.linalg.solve has an option for that side.",
            "Make the identity with S's batch dimensions (an eye of size b, expanded to S's shape), then solve "
            "X·(I + S) = I − S for X — the solver's left=False case."),
    "1.4": ("Measure rather than guess: compute the orthogonality error for more and more terms.",
            "cayley(S, neumann_terms=n) is the n-term approximation and primer.orthogonality_error measures it; start "
            "at n = 2.",
            "Increase n one at a time and stop at the first n whose error is below 1e-6 — the error does not fall at "
            "every step (section 4 says why), so do not stop early."),
    "2.1": ("Factor 0 is the identity; the later factors regroup coordinates in chunks that double in size.",
            "For factor i, cut every chunk of b·2^i coordinates into pieces of b/2 coordinates.",
            "Within each chunk, list the even-numbered pieces first and then the odd-numbered ones, each piece's "
            "coordinates kept in order."),
    "2.2": ("Follow one input through the factors: how many outputs does the first factor reach?",
            "The first factor reaches the b outputs of one block; each later factor doubles the set.",
            "That gives b·2^(m−1) outputs, but never more than d."),
    "2.3": ("Dense means every input reaches every output: b·2^(m−1) = 384.",
            "384 = 3·2^7, so b is 3 times a power of two; list those b with their m.",
            "Count m·d·(b−1)/2 for each dense (b, m) and keep the smallest: small blocks cost less, even with more "
            "factors."),
    "3.1": ("Count one block, then multiply: how many free numbers does a b × b skew-symmetric block have?",
            "A factor has d/b blocks (d = fan_in) of b(b−1)/2 numbers each, and there are m factors.",
            "Add fan_out numbers when the layer has BOFT's output scale."),
    "3.2": ("Which layers are adapted, and how many of them does ViT-B/16 have?",
            "12 blocks, each with a 768 × 768 query and value projection; LoRA of rank r on one layer stores "
            "r·(d_in + d_out) numbers.",
            "Multiply: 12 blocks × 2 projections × 8 × (768 + 768)."),
    "3.3": ("First list the (b, m) that fit the budget: LoRA r=4 on a 1024 × 1024 layer stores 4·(1024 + 1024).",
            "Among those, compare how many outputs each input reaches, b·2^(m−1) (at most 1024).",
            "Keep the densest; when several are equally dense, the one with fewer parameters m·d·(b−1)/2."),
    "4.1": ("Expand the square: ‖I − T‖_F² = tr((I − T)ᵀ(I − T)).",
            "For a rotation TᵀT = I, so that trace is 2d − 2·tr(T); and ‖T‖_F² = d.",
            "Return √(2 − 2·tr(T)/d) as a Python float."),
    "4.2": ("A row is on the front if no row with at most as many parameters has an error as low or lower.",
            "Sort by n_params, breaking ties by the smaller error first.",
            "Walk the sorted rows and keep a row only if its error is strictly below every error kept so far."),
    "5.1": ("∇(M) = Z_1·M − M·Z_{−1}: build the two shift matrices first.",
            "Z_f has ones just below the diagonal and f in the top-right corner (row 0, last column), in M's dtype.",
            "With Z_1 and Z_{−1} as dense n × n matrices, the displacement is one difference of two matrix products."),
    "5.2": ("C·x is a cyclic convolution of c and x, and the DFT turns a convolution into a product.",
            "Transform c and x with the real FFT, multiply, transform back; the batch dimensions of x broadcast.",
            "The inverse real FFT needs the length n explicitly, or an odd n loses a sample."),
    "6.1": ("Every mode-n fibre is multiplied by U: the mode's size changes from r_n to d_n.",
            "Move the mode to the last position, so that each fibre is a row vector.",
            "Multiply those rows by Uᵀ, then move the last dimension back to the mode's position."),
    "6.2": ("A Tucker update stores a core and one factor matrix per mode.",
            "The core has one entry per combination of ranks: the product of the r_n.",
            "Add one d_n × r_n factor per mode n: Π r_n + Σ d_n·r_n."),
    "7.1": ("Pair the seeds: subtract b's value from a's seed by seed, then treat the differences as one sample.",
            "The mean of the differences is the estimate; its standard error is their sample standard deviation "
            "(n − 1 in the denominator) divided by √n.",
            "The half-width is the 0.975 quantile of Student's t with n − 1 degrees of freedom (t_quantile) times the "
            "standard error; the interval is the mean minus and plus it."),
    "8.1": ("The rule reads the validation column only, and perplexity is lower-is-better.",
            "Find the lowest validation perplexity in the table; more than one rate may reach it.",
            "Among the rates that reach the lowest perplexity, the rule takes the lower rate."),
    "9.1": ("PEFT's LoRA on a convolution is two convolutions: A reads the input as the base does, B is 1 × 1.",
            "A has r output channels and the base's kernel over c_in input channels: r·c_in·k·k numbers; B maps r "
            "channels to c_out.",
            "Add A's r·c_in·k² and B's c_out·r: r·(c_in·k² + c_out), the fan-in of a convolution being c_in·k²."),
    "10.1": ("Find the file's table of ms per step and the row for d = 4096.",
             "You need two numbers from that row: PEFT BOFT's time and boftlab BOFT m=2's time.",
             "Divide PEFT BOFT's ms per step by boftlab BOFT m=2's; the answer is a plain number, above 1 if boftlab "
             "is faster."),
}
#: failed tries per exercise in this session: the step of its hint ladder
TRIES: dict[str, int] = {}


def check(exercise: str, answer: Any, hints: str = "all") -> Result:
    """The notebooks' checking cell: run exercise ``exercise``'s checker on ``answer``. A wrong answer or failing
    code gets a hint: the first on the first failed try, then one more each try (``hints="all"``), or always the
    first (``hints="first"``: the teacher kit's student notebooks). An exercise not attempted yet gets none."""
    if hints not in ("all", "first"):
        raise ValueError(f"hints={hints!r}: give 'all' (a further hint on each try) or 'first' (the first hint only)")
    if exercise not in EXERCISES:
        return Result(exercise, False, f"There is no exercise {exercise!r}; the exercises are {list(EXERCISES)}.")
    result = EXERCISES[exercise].checker(answer)
    if result.passed or result.message.startswith("Not attempted"):
        return result
    TRIES[exercise] = TRIES.get(exercise, 0) + 1
    ladder = HINTS[exercise]
    step = 1 if hints == "first" else min(TRIES[exercise], len(ladder))
    more = " (Check again after your next change for a further hint.)" if hints == "all" and step < len(ladder) else ""
    return Result(exercise, False, f"{result.message} Hint {step} of {len(ladder)}: {ladder[step - 1]}{more}")


#: what the checker running now converted in the answer (a NumPy int read as an int, …); said with its verdict
_NOTES: list[tuple[str, str]] = []  # (what kind of value was converted, the note)


def _noted() -> str:
    """The conversions of this check, once per kind of value (a function's answer is converted on every call)."""
    if not _NOTES:
        return ""
    first = {}
    for kind, text in _NOTES:
        first.setdefault(kind, text)
    more = len(_NOTES) - len(first)
    return (f" (Read your answer as Python/torch values: {'; '.join(first.values())}"
            + (f"; and {more} more like {'it' if len(first) == 1 else 'them'}" if more else "") + ".)")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-d tensor ({value.dtype})"
    return f"a {'NumPy ' if type(value).__module__ == 'numpy' else ''}{type(value).__name__}"


def _as_number(value: Any, what: str, integer: bool = False) -> int | float:
    """``value`` as a finite Python int (``integer``) or float, or ``_Wrong``. A NumPy scalar, a one-element tensor
    or list, or a whole float for a count is converted, and the conversion noted (``_NOTES``); a bool, a complex
    number, NaN and ±inf are wrong answers, never converted."""
    kind = "a whole number" if integer else "a real number"
    number = value
    if isinstance(number, (list, tuple)) and len(number) == 1:
        number = number[0]
    real = isinstance(number, torch.Tensor) and not number.is_complex() and number.dtype != torch.bool
    if real and number.numel() == 1:
        number = number.item()
    elif type(number).__module__ == "numpy" and getattr(number, "size", None) == 1 and hasattr(number, "item"):
        number = number.item()
    if isinstance(number, complex) or (isinstance(number, torch.Tensor) and number.is_complex()):
        raise _Wrong(f"{what} should be {kind}, got the complex {value!r}: the answer is real (if the imaginary part "
                     "is rounding error, your method takes a detour through complex numbers; return the real part).")
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise _Wrong(f"{what} should be {kind}, got {str(value)[:80]} ({_describe(value)}).")
    if not math.isfinite(number):
        raise _Wrong(f"{what} is {number!r}, not a finite number: the answer is finite (check for 0/0 or a sqrt of "
                     "a negative number).")
    if integer and isinstance(number, float):
        if not number.is_integer():
            raise _Wrong(f"{what} should be a whole number, got {number!r}.")
        number = int(number)
    if type(number) is not type(value):
        _NOTES.append((_describe(value), f"{what}, {_describe(value)}, as the {type(number).__name__} {number!r}"))
    return number


def _as_pair(value: Any, what: str) -> tuple[int, int]:
    """``value`` as a tuple of two ints (a list or NumPy ints converted and noted), or ``_Wrong``."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise _Wrong(f"Answer a tuple (block_size, n_factors), got {value!r}.")
    pair = tuple(_as_number(v, f"{what}[{i}]", integer=True) for i, v in enumerate(value))
    if isinstance(value, list):
        _NOTES.append(("a list", f"{what}, a list, as the tuple {pair}"))
    return pair  # type: ignore[return-value]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` as a real, finite tensor (a list or NumPy array converted and noted), or ``_Wrong``."""
    if type(value).__module__ == "numpy" or isinstance(value, (list, tuple)):
        try:
            converted = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            converted = None
        if converted is not None:
            shape = tuple(converted.shape)
            _NOTES.append((_describe(value), f"{what}, {_describe(value)}, as a tensor of shape {shape}"))
            value = converted
    if not isinstance(value, torch.Tensor):
        raise _Wrong(f"{what} should return a torch.Tensor, got {type(value).__name__}.")
    if value.is_complex():
        imaginary = value.imag.abs().max().item() if value.numel() else 0.0
        raise _Wrong(f"{what} is complex (largest |imaginary part| {imaginary:.3g}), but the answer is real: an "
                     "inverse transform of real data should give back real values.")
    if value.is_floating_point() and not torch.isfinite(value).all():
        bad = int((~torch.isfinite(value)).sum())
        raise _Wrong(f"{what} holds {bad} NaN/inf value(s); the answer is finite (check for 0/0 or an overflow).")
    return value


def _compare(got: Any, expected: torch.Tensor, what: str, atol: float = 1e-8, rtol: float = 1e-6) -> None:
    """Raise ``_Wrong`` unless ``got`` is a real, finite tensor of ``expected``'s shape with the same values."""
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(expected.shape):
        raise _Wrong(f"{what} has shape {tuple(got.shape)}; expected {tuple(expected.shape)}.")
    difference = (got.double() - expected.double()).abs()
    if not torch.allclose(got.double(), expected.double(), atol=atol, rtol=rtol):
        index = tuple(int(i) for i in torch.nonzero(difference == difference.max())[0])
        raise _Wrong(f"{what} differs from boftlab's by up to {difference.max().item():.3g} (at index {index}: yours "
                     f"{got.double()[index].item():.6g}, expected {expected.double()[index].item():.6g}).")


def _compare_value(got: Any, expected: Any, what: str) -> None:
    if got != expected:
        raise _Wrong(f"{what}: you answered {got!r}; that is not it.")


# --- notebook 01: the primer ----------------------------------------------------------------------------------------
@_checker("1.1", "LoRA's update", "01_primer", "lora_delta")
def check_lora_delta(lora_delta: Callable) -> str:
    """Against PEFT's own LoRA layer (``get_delta_weight``) for two ranks and two α."""
    from .primer import lora_layer

    generator = torch.Generator().manual_seed(11)
    for rank, alpha in ((4, 8.0), (2, 2.0)):
        layer = lora_layer(torch.randn(6, 5, generator=generator), rank, alpha)
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        b = torch.randn(b.shape, generator=generator)
        with torch.no_grad():
            layer.lora_B["default"].weight.copy_(b)
            expected = layer.get_delta_weight("default")
        _compare(lora_delta(a, b, alpha), expected, f"lora_delta(A, B, alpha={alpha}) with r={rank}", atol=1e-6)
    return "Your ΔW equals PEFT's LoRA update (get_delta_weight) for r=4, α=8 and r=2, α=2."


@_checker("1.2", "Angles between neurons", "01_primer", "neuron_cosines")
def check_neuron_cosines(neuron_cosines: Callable) -> str:
    """Against ``primer.neuron_cosines``; then the student's function measures OFT against LoRA on one weight."""
    from . import primer

    generator = torch.Generator().manual_seed(13)
    weight = torch.randn(24, 16, generator=generator, dtype=torch.float64)
    _compare(neuron_cosines(weight), primer.neuron_cosines(weight), "neuron_cosines(W) for a 24 × 16 W")
    oft = primer.oft_weight(weight.float(), 4, 0.3, generator).double()
    lora = primer.lora_weight(weight.float(), 2, (oft - weight).norm().item(), generator).double()
    change = {name: (neuron_cosines(new) - neuron_cosines(weight)).abs().max().item() for name, new in (("OFT", oft), ("LoRA", lora))}
    return (f"Your cosines equal boftlab's. With them, on a random 24 × 16 weight and updates of the same size: OFT "
            f"changes no cosine by more than {change['OFT']:.1e}, LoRA by up to {change['LoRA']:.2f}.")


@_checker("1.3", "The Cayley transform", "01_primer", "cayley")
def check_cayley(cayley: Callable) -> str:
    """Against ``boftlab.butterfly.cayley`` on a batch of random skew-symmetric blocks; then orthogonality and det."""
    from ..butterfly import cayley as boft_cayley, skew_symmetric

    skew = skew_symmetric(torch.randn(3, 10, generator=torch.Generator().manual_seed(12), dtype=torch.float64), 5)
    got = cayley(skew)
    _compare(got, boft_cayley(skew), "cayley(S) for a (3, 5, 5) batch")
    gram = got.transpose(-1, -2) @ got
    return (f"Your Q equals boftlab.butterfly.cayley: max |QᵀQ − I| = {(gram - torch.eye(5)).abs().max().item():.1e}, "
            f"det Q = {[round(d, 6) for d in torch.linalg.det(got).tolist()]} (all +1: a rotation, never a reflection).")


@_checker("1.4", "How many Neumann terms?", "01_primer", "neumann_terms", "value")
def check_neumann_terms(answer: Any) -> str:
    """Against a search with ``cayley(S, neumann_terms=n)`` on ``primer.example_skew(8, 0.5)``."""
    from ..butterfly import cayley
    from .primer import example_skew, orthogonality_error

    skew = example_skew(8, 0.5)
    errors = {n: orthogonality_error(cayley(skew, n)) for n in range(2, 12)}
    expected = next(n for n, e in errors.items() if e < 1e-6)
    answer = _as_number(answer, "the number of terms", integer=True)
    if not 2 <= answer <= 11:
        raise _Wrong(f"{answer} terms: the series has at least 2 (I − S)." if answer < 2 else
                     f"{answer} terms: far more than needed, 11 give max |QᵀQ − I| = {errors[11]:.1e} already.")
    if answer != expected:
        got = errors[answer]
        raise _Wrong(f"With {answer} terms max |QᵀQ − I| = {got:.2e}"
                     + (" ≥ 1e-6: not enough." if got >= 1e-6 else " < 1e-6, but fewer terms also suffice."))
    return f"{expected} terms: max |QᵀQ − I| = {errors[expected]:.1e} < 1e-6, while {expected - 1} give {errors[expected - 1]:.1e}."


# --- notebook 02: information transmission ------------------------------------------------------------------------
@_checker("2.1", "The butterfly permutation", "02_information_transmission", "butterfly_permutation")
def check_butterfly_permutation(butterfly_permutation: Callable) -> str:
    """Against ``boftlab.butterfly_structure.butterfly_permutation`` on every factor of five (d, b)."""
    from ..butterfly_structure import butterfly_permutation as reference, valid_n_factors

    cases = [(d, b, i) for d, b in ((8, 2), (16, 4), (32, 2), (64, 8), (384, 6)) for i in range(max(valid_n_factors(d, b)))]
    for d, b, i in cases:
        got = butterfly_permutation(d, b, i)
        expected = reference(d, b, i)
        got = _as_tensor(got, f"butterfly_permutation({d}, {b}, {i})")
        if got.tolist() != expected.tolist():
            shown = got.tolist() if isinstance(got, torch.Tensor) else got
            raise _Wrong(f"butterfly_permutation({d}, {b}, {i}) gave {str(shown)[:120]}; expected "
                         f"{str(expected.tolist())[:120]}.")
    return f"Your permutations equal boftlab's on all {len(cases)} factors of d ∈ {{8, 16, 32, 64, 384}}."


@_checker("2.2", "How many outputs does one input reach?", "02_information_transmission", "outputs_reached")
def check_outputs_reached(outputs_reached: Callable) -> str:
    """Against the reachability pattern (``teaching.butterfly.reachability``), including notebook 00's BOFT."""
    from ..butterfly_structure import valid_n_factors
    from .butterfly import reachability

    cases = [(d, b, m) for d, b in ((16, 4), (32, 2), (64, 8), (96, 6), (384, 8)) for m in valid_n_factors(d, b)]
    for d, b, m in cases:
        expected = int(reachability(d, b, m)[:, 0].sum())
        got = _as_number(outputs_reached(d, b, m), f"outputs_reached({d}, {b}, {m})", integer=True)
        if got != expected:
            raise _Wrong(f"outputs_reached({d}, {b}, {m}) = {got!r}; the pattern of R = B_m⋯B_1 has {expected} non-zeros "
                         f"in every column.")
    reach = outputs_reached(384, 8, 2)
    return (f"Right on all {len(cases)} cases. Notebook 00's BOFT(b=8, m=2) at d=384 connects each input to {reach} of 384 "
            f"outputs ({reach / 384:.1%}): far from the dense R of this notebook's argument; at b=8 even the largest "
            f"butterfly (m={max(valid_n_factors(384, 8))}) reaches only {outputs_reached(384, 8, max(valid_n_factors(384, 8)))}.")


@_checker("2.3", "A dense butterfly for d = 384", "02_information_transmission", "dense_butterfly_384", "value")
def check_dense_butterfly_384(answer: Any) -> str:
    """Against every valid (b, m) at d = 384 (``valid_n_factors``), counted with ``boftlab.counts``."""
    from .. import counts
    from ..butterfly_structure import valid_n_factors

    dim = 384
    dense = {(b, m): counts.boft_params(dim, dim, b, m, scale=False) for b in range(2, dim + 1)
             for m in valid_n_factors(dim, b) if b * 2 ** (m - 1) == dim}
    best = min(dense, key=dense.get)
    answer = _as_pair(answer, "your answer")
    if answer not in dense:
        raise _Wrong(f"{answer} is not a dense butterfly at d = 384 (valid n_factors for b={answer[0]}: "
                     f"{valid_n_factors(dim, answer[0]) if answer[0] >= 1 else []}); dense needs b·2^(m−1) = 384.")
    _compare_value(answer, best, f"{answer} is dense with {dense[answer]} free parameters")
    return f"{best}: {dense[best]} free parameters; the dense choices are {dict(sorted(dense.items()))}."


# --- notebook 03: parameter counts ----------------------------------------------------------------------------------
@_checker("3.1", "One layer by hand", "03_parameter_counts", "boft_layer_count")
def check_boft_layer_count(boft_layer_count: Callable) -> str:
    """Against ``counts.boft_params`` (a meta-device BOFTLayer's parameters) for several layers."""
    from .. import counts

    cases = [(768, 768, 8, 2, True), (768, 768, 8, 2, False), (384, 1536, 4, 3, True), (1024, 4096, 16, 1, False)]
    for case in cases:
        expected = counts.boft_params(*case[:4], scale=case[4])
        got = _as_number(boft_layer_count(*case), f"boft_layer_count{case}", integer=True)
        if got != expected:
            raise _Wrong(f"boft_layer_count{case} = {got!r}; a BOFTLayer stores {expected}.")
    return f"Right on all {len(cases)} layers, e.g. BOFT(b=8, m=2) + scale on 768 × 768: {counts.boft_params(768, 768, 8, 2)}."


@_checker("3.2", "A whole model by hand", "03_parameter_counts", "vit_lora_count", "value")
def check_vit_lora_count(answer: Any) -> str:
    """Against ``counts.count("vit-b/16", "lora", "query, value", rank=8)`` (the model built on the meta device)."""
    from .. import counts

    expected = counts.count("vit-b/16", "lora", "query, value", rank=8)
    answer = _as_number(answer, "your count", integer=True)
    _compare_value(answer, expected, "LoRA r=8 on ViT-B/16's query and value")
    return f"{expected:,} trainable numbers, {expected / counts.n_base_params('vit-b/16'):.2%} of ViT-B/16."


@_checker("3.3", "Choose (b, m) for a budget", "03_parameter_counts", "budget_choice", "value")
def check_budget_choice(answer: Any) -> str:
    """Against a search over every valid (b, m) at d = 1024 with ``counts.boft_params``."""
    from .. import counts
    from ..butterfly_structure import valid_n_factors

    dim, budget = 1024, counts.lora_params(1024, 1024, 4)
    fits = {(b, m): counts.boft_params(dim, dim, b, m, scale=False) for b in range(2, dim + 1)
            for m in valid_n_factors(dim, b) if counts.boft_params(dim, dim, b, m, scale=False) <= budget}
    reach = {bm: min(dim, bm[0] * 2 ** (bm[1] - 1)) for bm in fits}
    best = max(fits, key=lambda bm: (reach[bm], -fits[bm]))
    answer = _as_pair(answer, "your answer")
    if answer not in fits:
        raise _Wrong(f"{answer} is not a butterfly within LoRA r=4's budget of {budget} (m·d·(b−1)/2 must be ≤ {budget}"
                     " and b·2^(m−1) must divide 1024).")
    _compare_value(answer, best, f"{answer} reaches {reach[answer]} of 1024 outputs with {fits[answer]} parameters")
    return f"{best}: dense ({reach[best]} of 1024) with {fits[best]} free parameters, within LoRA r=4's {budget}."


# --- notebook 04: expressivity --------------------------------------------------------------------------------------
@_checker("4.1", "The identity's error", "04_expressivity", "identity_error")
def check_identity_error(identity_error: Callable) -> str:
    """Against ``expressivity.relative_error(I, T)`` on random rotations of three sizes."""
    from .expressivity import random_rotation, relative_error

    generator = torch.Generator().manual_seed(41)
    for dim in (4, 16, 64):
        target = random_rotation(dim, generator)
        expected = relative_error(torch.eye(dim), target)
        got = _as_number(identity_error(target), f"identity_error(T) for a rotation in SO({dim})")
        if abs(got - expected) > 1e-4:
            raise _Wrong(f"identity_error(T) for a rotation in SO({dim}) = {got!r}; ‖I − T‖_F/‖T‖_F = {expected:.6f}.")
    return "Right: √(2 − 2·tr(T)/d), ≈ √2 for a random rotation, whose trace is near 0."


@_checker("4.2", "The Pareto front", "04_expressivity", "frontier")
def check_frontier(frontier: Callable) -> str:
    """Against ``expressivity.frontier`` on a table with ties and dominated rows."""
    from .expressivity import frontier as reference

    rows = [{"structure": s, "n_params": p, "error": e} for s, p, e in
            [("a", 10, 0.9), ("b", 10, 0.8), ("c", 20, 0.85), ("d", 30, 0.5), ("e", 40, 0.5), ("f", 50, 0.1), ("g", 5, 1.2)]]
    expected = [r["structure"] for r in reference(rows)]
    got = frontier([dict(r) for r in rows])
    names = [r["structure"] for r in got] if isinstance(got, list) and all(isinstance(r, dict) for r in got) else got
    _compare_value(names, expected, "the front of the test table (as structure names)")
    return f"Right: the front is {expected}; a row with more parameters must be strictly better to be on it."


# --- notebook 05: structured matrices -------------------------------------------------------------------------------
@_checker("5.1", "The displacement operator", "05_structured_matrices", "displacement")
def check_displacement(displacement: Callable) -> str:
    """Against ``surm.displacement``; then the displacement ranks of a circulant and a Toeplitz through it."""
    from .. import surm

    generator = torch.Generator().manual_seed(52)
    matrix = torch.randn(7, 7, generator=generator, dtype=torch.float64)
    _compare(displacement(matrix), surm.displacement(matrix), "displacement(M) for a 7 × 7 M")
    circulant = surm.circulant(torch.randn(7, generator=generator, dtype=torch.float64))
    toeplitz = surm.toeplitz(torch.randn(13, generator=generator, dtype=torch.float64), 7, 7)
    ranks = [int(torch.linalg.matrix_rank(displacement(m))) for m in (circulant, toeplitz)]
    return f"Your ∇ equals boftlab's; through it a circulant has displacement rank {ranks[0]}, a Toeplitz {ranks[1]}."


@_checker("5.2", "A circulant product by FFT", "05_structured_matrices", "circulant_matvec")
def check_circulant_matvec(circulant_matvec: Callable) -> str:
    """Against ``surm.circulant`` (the dense matrix) and ``surm.circulant_matvec`` for even and odd n, batched x."""
    from .. import surm

    generator = torch.Generator().manual_seed(51)
    for n in (8, 15):
        c = torch.randn(n, generator=generator, dtype=torch.float64)
        x = torch.randn(4, n, generator=generator, dtype=torch.float64)
        _compare(circulant_matvec(c, x), x @ surm.circulant(c).T, f"circulant_matvec(c, x) with n={n}, x: (4, {n})")
    return "Your FFT product equals the dense circulant matrix (and surm.circulant_matvec) for n = 8 and 15."


# --- notebook 06: tensor cores --------------------------------------------------------------------------------------
@_checker("6.1", "The mode product", "06_tensor_core", "mode_product")
def check_mode_product(mode_product: Callable) -> str:
    """Against ``tensor_core.mode_product`` on every mode of a 4-mode tensor."""
    from ..tensor_core import mode_product as reference

    generator = torch.Generator().manual_seed(61)
    core = torch.randn(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    for mode in range(4):
        matrix = torch.randn(6 + mode, core.shape[mode], generator=generator, dtype=torch.float64)
        _compare(mode_product(core, matrix, mode), reference(core, matrix, mode), f"mode_product(G, U, mode={mode})")
    return "Your mode products equal boftlab's on all four modes of a (2, 3, 4, 5) core."


@_checker("6.2", "A Tucker adapter's size", "06_tensor_core", "tucker_count")
def check_tucker_count(tucker_count: Callable) -> str:
    """Against the parameters a ``TensorCoreLayer`` stores on a Linear, a conv and a depthwise conv."""
    from torch import nn

    from ..tensor_core import TensorCoreConfig

    for base, ranks in ((nn.Linear(32, 16), (4, 4)), (nn.Conv2d(8, 16, 3), (4, 2, 3, 3)),
                        (nn.Conv2d(12, 12, 5, groups=12), (6, 1, 2, 2))):
        shape = tuple(base.weight.shape)
        expected = TensorCoreConfig(ranks=ranks).make_layer(base).n_trainable()
        got = _as_number(tucker_count(shape, ranks), f"tucker_count({shape}, {ranks})", integer=True)
        if got != expected:
            raise _Wrong(f"tucker_count({shape}, {ranks}) = {got!r}; the layer stores {expected}.")
    return "Right on a Linear, a conv and a depthwise conv: Π r_n + Σ d_n·r_n, what TensorCoreLayer stores."


# --- notebook 07: ViT fine-tuning -----------------------------------------------------------------------------------
@_checker("7.1", "A paired interval", "07_vit_finetuning", "paired_interval")
def check_paired_interval(paired_interval: Callable) -> str:
    """Against ``reproduce.protocol.Paired.of`` (the interval every results table prints) on three sets of seeds."""
    from ..reproduce.protocol import Paired

    cases = [([0.866, 0.881, 0.859], [0.875, 0.871, 0.866]), ([0.91, 0.93, 0.92, 0.90], [0.88, 0.90, 0.91, 0.87]),
             ([120.4, 118.9], [121.0, 120.2])]
    for a, b in cases:
        expected = Paired.of("a", "b", a, b)
        got = paired_interval(list(a), list(b))
        if not (isinstance(got, (tuple, list)) and len(got) == 3):
            raise _Wrong(f"paired_interval({a}, {b}) should return (mean, lo, hi), got {str(got)[:80]}.")
        values = [_as_number(v, f"paired_interval({a}, {b})[{i}]") for i, v in enumerate(got)]
        for name, value, want in zip(("mean", "lo", "hi"), values, (expected.mean, expected.lo, expected.hi)):
            if abs(value - want) > 1e-9 * max(1.0, abs(want)):
                raise _Wrong(f"paired_interval({a}, {b}): {name} = {value:.6g}; the paired-t interval has "
                             f"{name} = {want:.6g} (mean {expected.mean:+.6g} "
                             f"[{expected.lo:+.6g}, {expected.hi:+.6g}]).")
    first = Paired.of("a", "b", *cases[0])
    return (f"Your intervals equal the protocol's (Paired.of). The first pair, 3 seeds: {first.interval()} — it "
            f"contains 0, so those two methods are {first.ranking(True)}.")


# --- notebook 08: LLM fine-tuning -----------------------------------------------------------------------------------
#: exercise 8.1's validation table: learning rate -> validation perplexity after the last step (lower is better)
VALIDATION_8_1 = {1e-4: 142.3, 3e-4: 131.8, 1e-3: 127.4, 3e-3: 127.4, 1e-2: 158.9}


@_checker("8.1", "Which rate does the rule pick?", "08_llm_finetuning", "chosen_rate", "value")
def check_chosen_rate(answer: Any) -> str:
    """Against the rule of ``reproduce.protocol.choose_lr``: the best last validation value, ties to the lower rate."""
    expected = max(VALIDATION_8_1, key=lambda lr: (-VALIDATION_8_1[lr], -lr))  # choose_lr's key, lower is better
    answer = _as_number(answer, "the rate")
    match = [lr for lr in VALIDATION_8_1 if math.isclose(answer, lr, rel_tol=1e-6)]
    if not match:
        raise _Wrong(f"{answer!r} is not a rate of the table; the rates are {list(VALIDATION_8_1)}.")
    if match[0] != expected:
        better = min(VALIDATION_8_1.values())
        raise _Wrong(f"At {match[0]:g} the validation perplexity is {VALIDATION_8_1[match[0]]}"
                     + ("; lower is better, so that is the worst of the grid, not the best." if
                        VALIDATION_8_1[match[0]] == max(VALIDATION_8_1.values()) else
                        f", but {better} is reached too." if VALIDATION_8_1[match[0]] != better else
                        ", tied with another rate: which way does the rule break a tie?"))
    return (f"{expected:g}: perplexity {VALIDATION_8_1[expected]}, tied with 3e-3 and broken towards the lower rate; "
            "the test set is never read to choose.")


# --- notebook 09: diffusion fine-tuning -----------------------------------------------------------------------------
@_checker("9.1", "LoRA on a UNet convolution", "09_diffusion_finetuning", "lora_conv_count")
def check_lora_conv_count(lora_conv_count: Callable) -> str:
    """Against the parameters PEFT's LoRA layer stores on a ``Conv2d``."""
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from .. import counts

    for c_in, c_out, k, rank in ((32, 32, 3, 6), (64, 32, 3, 4), (16, 48, 1, 8), (320, 640, 3, 4)):
        model = get_peft_model(nn.Sequential(nn.Conv2d(c_in, c_out, k)), LoraConfig(r=rank, target_modules=["0"]))
        expected = sum(p.numel() for p in model.parameters() if p.requires_grad)
        got = _as_number(lora_conv_count(c_in, c_out, k, rank), f"lora_conv_count({c_in}, {c_out}, {k}, {rank})",
                         integer=True)
        if got != expected:
            raise _Wrong(f"lora_conv_count({c_in}, {c_out}, {k}, {rank}) = {got!r}; PEFT's LoRA layer on that "
                         f"Conv2d stores {expected}.")
    dense = 320 * 640 * 9
    return (f"Right on four convolutions, as PEFT stores them. On Stable Diffusion's 320 → 640 3×3 conv, r=4 stores "
            f"{counts.lora_params(320 * 9, 640, 4):,} numbers, {counts.lora_params(320 * 9, 640, 4) / dense:.1%} of "
            f"the kernel's {dense:,}.")


# --- notebook 10: speed and memory ----------------------------------------------------------------------------------
#: exercise 10.1 reads this committed results file (boftlab/bench/results/)
SPEED_FILE_10_1 = "cpu-2026-11-29.md"


def _speed_ratio_10_1() -> tuple[float, float, float]:
    """PEFT BOFT's and boftlab BOFT m=2's ms per step at d = 4096 in ``SPEED_FILE_10_1``, and their ratio."""
    from ..bench import read_results, result_files

    path = next(f for f in result_files() if f.name == SPEED_FILE_10_1)
    table = next(t for t in read_results(path) if t.suite == "linear" and "ms / step" in t.header)
    column = {name: i for i, name in enumerate(table.header)}
    times = {row[column["method"]]: row[column["ms / step"]] for row in table.rows if row[column["d"]] == 4096}
    peft = next(v for k, v in times.items() if k.startswith("PEFT BOFT m=2"))
    ours = next(v for k, v in times.items() if k.startswith("boftlab BOFT m=2"))
    return peft, ours, peft / ours


@_checker("10.1", "Read the speed table", "10_speed_and_memory", "peft_over_boftlab", "value")
def check_peft_over_boftlab(answer: Any) -> str:
    """Against the committed file's own numbers (``bench.read_results``); a ratio rounded to 2 significant digits
    passes (within 1 %)."""
    peft, ours, expected = _speed_ratio_10_1()
    answer = _as_number(answer, "the ratio")
    if math.isclose(answer, 1 / expected, rel_tol=0.01):
        raise _Wrong(f"{answer:.3g} is boftlab's time ÷ PEFT's; the question asks the other way round.")
    if not math.isclose(answer, expected, rel_tol=0.01):
        raise _Wrong(f"{answer:.4g} is not the ratio of the two times in that row (within 1 %).")
    return (f"{expected:.1f}×: {peft:.0f} ms against {ours:.0f} ms per step at d = 4096 — PEFT's BOFT builds dense "
            "d × d matrices, O(m·d³), boftlab multiplies by the factors.")
