"""A family defined inside a test passes the tests every family passes — the README's "Adding a family", checked.

``define_diagonal_family`` is a whole family file: ΔW = α·diag(s), one trainable number per diagonal entry of the
(out, in) weight. Its config registers itself in ``FAMILIES`` (taken out again after each test), and then, with nothing
edited anywhere else, it runs through the real test functions of ``tests/test_contract.py`` (every one that is
parametrised over the families' configs), the seeded round trips of ``tests/test_round_trips.py`` (merge → unmerge,
save → load, whole-model state_dict, pickle), ``boftlab.save_adapter`` / ``load_adapter`` and a layer timing from the
bench.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from typing import Any, ClassVar, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import boftlab
import test_contract
import test_round_trips
from boftlab import base_layers
from boftlab.base_layers import Conv1D
from boftlab.contract import FAMILIES, AdapterConfig, AdapterLayer, check_number, merge_dtype
from helpers import perturb

FAMILY = "diagonal"


def define_diagonal_family() -> tuple[type[AdapterConfig], type[AdapterLayer]]:
    """The family's own file, as ``myfamily.py`` would hold it: the config, then the layer. Defining the config class
    registers the family."""

    @dataclasses.dataclass
    class DiagonalConfig(AdapterConfig):
        """ΔW = α · diag(s) on a linear layer's (out, in) weight: k = min(out, in) trainable numbers, zero at init.

        alpha (α): a constant multiplying ΔW. path: "auto", "input" (base(x) + α·s ⊙ x) or "weight" (W + ΔW, one
        call of the base op).
        """

        family: ClassVar[str] = FAMILY
        option_space: ClassVar[dict[str, tuple]] = dict(alpha=(-1.5, 0.5, 2.0), path=("auto", "input", "weight"))
        examples: ClassVar[tuple[dict, ...]] = (dict(alpha=0.5), dict(alpha=2.0, path="input"))

        alpha: float = 1.0
        path: str = "auto"

        def __post_init__(self) -> None:
            self.alpha = check_number("alpha", self.alpha)
            if self.alpha == 0:
                raise ValueError("alpha=0 makes ΔW and every adapter gradient zero; use a non-zero alpha, e.g. 1.0")
            self.check_path()

        def supported_layers(self) -> tuple[type[nn.Module], ...]:
            return (nn.Linear, Conv1D)  # and so bitsandbytes' quantized linear layers, which derive from nn.Linear

        def layer_class(self) -> type[AdapterLayer]:
            return DiagonalLayer

    class DiagonalLayer(AdapterLayer):
        """y = base(x) + α · pad(s ⊙ x[..., :k]) to d_out: W' = W + α·diag(s) (the leading k × k block)."""

        def __init__(self, base_layer: nn.Module, config: DiagonalConfig) -> None:
            super().__init__(base_layer, config)
            self.fan_out, self.fan_in = base_layers.weight_shape(base_layer)
            self.check_forced_path({"weight": "needs the base weight, which this quantized layer stores packed"})
            size = min(self.fan_out, self.fan_in)
            self.diagonal = nn.Parameter(torch.zeros(size, device=base_layer.weight.device))  # ΔW = 0 at init

        def delta_weight(self, dtype: torch.dtype) -> torch.Tensor:
            """ΔW = α·diag(s) zero-padded to (out, in), in ``dtype``. O(out · in)."""
            k = self.diagonal.numel()
            diagonal = torch.diag(self.diagonal.to(dtype))  # (k, k)
            return self.config.alpha * F.pad(diagonal, (0, self.fan_in - k, 0, self.fan_out - k))  # (out, in)

        def paths(self) -> tuple[str, ...]:
            return ("input",) if self.quantized_base else ("input", "weight")

        def path_costs(self, x_shape: Sequence[int], training: bool, input_requires_grad: bool) -> dict[str, int]:
            """Base product C₀ = rows·out·in; the input path adds rows·k, the weight path k (assembling W')."""
            rows, k = math.prod(x_shape) // self.fan_in, self.diagonal.numel()
            base = rows * self.fan_out * self.fan_in
            g = int(input_requires_grad)
            costs = ({"input": (1 + g) * base + 3 * rows * k, "weight": (2 + g) * base + 3 * k} if training
                     else {"input": base + rows * k, "weight": base + k})
            return {path: costs[path] for path in self.paths()}

        def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if self.choose_path(x) == "input":
                k = self.diagonal.numel()
                delta = self.config.alpha * self.diagonal.to(x.dtype) * x[..., :k]  # (..., k)
                return self.base_layer(x) + F.pad(delta, (0, self.fan_out - k))  # (..., out)
            weight = base_layers.weight(self.base_layer)
            return base_layers.run(self.base_layer, x, weight + self.delta_weight(weight.dtype))

        def merged_weights(self) -> dict[str, torch.Tensor]:
            return self._shifted(+1)

        def unmerged_weights(self) -> dict[str, torch.Tensor]:
            return self._shifted(-1)

        def _shifted(self, sign: int) -> dict[str, torch.Tensor]:
            """W ± ΔW in fp64, rounded once to W's dtype (ValueError for a quantized base: ``base_layers.weight``)."""
            weight = base_layers.weight(self.base_layer)
            dtype = merge_dtype(weight)
            shifted = weight.to(dtype) + sign * self.delta_weight(dtype)
            return base_layers.stored(self.base_layer, shifted.to(weight.dtype))

    return DiagonalConfig, DiagonalLayer


@pytest.fixture
def diagonal(monkeypatch) -> type[AdapterConfig]:
    """The toy family, registered for one test: FAMILIES gets it back out afterwards (monkeypatch recorded the key as
    absent), and its classes are names of this module while it lasts, so that pickle finds them."""
    monkeypatch.setitem(FAMILIES, FAMILY, None)  # the class below registers itself over this placeholder
    config_class, layer_class = define_diagonal_family()
    assert FAMILIES[FAMILY] is config_class
    for cls in (config_class, layer_class):
        cls.__qualname__ = cls.__name__
        monkeypatch.setattr(sys.modules[__name__], cls.__name__, cls, raising=False)
    return config_class


def examples(config_class: type[AdapterConfig]) -> list[tuple[str, AdapterConfig]]:
    return [(FAMILY, config) for config in config_class.example_configs()]


def values(cases) -> list[tuple]:
    """The argument tuples of ``pytest.param`` cases."""
    return [case.values for case in cases]


#: every test of test_contract that is parametrised over the families' configs -> (which cases it takes, the values of
#: its other parameters); test_the_contract_tests_are_all_here keeps this in step with test_contract
CONTRACT_TESTS = {
    "test_identity_at_init": ("by_layer", {}),
    "test_merge_unmerge_round_trip": ("by_layer", {}),
    "test_merge_refuses_a_non_finite_adapter_and_leaves_the_base": ("by_layer", {"value": [math.nan, math.inf]}),
    "test_path_protocol": ("by_layer", {}),
    "test_forward_on_the_meta_device_gives_the_shape": ("by_layer", {}),
    "test_every_path_accepts_every_input_shape_the_base_layer_accepts": ("by_layer", {}),
    "test_scale_grad_by_freq_gives_every_path_the_weight_paths_gradients": ("embedding", {}),
    "test_save_load_and_summary": ("by_layer", {"tmp_path": None}),
    "test_a_training_step_after_an_evaluation_gives_every_trainable_tensor_its_gradient": ("by_base", {}),
    "test_unsupported_layer_is_refused_naming_the_supported_types": ("by_config", {}),
    "test_config_round_trips_through_its_dict": ("by_config", {}),
    "test_whole_model_state_dict_round_trip": ("by_layer", {"merged": [False, True]}),
    "test_state_dict_holds_what_the_model_holds_and_a_plain_load_fails": ("by_layer", {"tmp_path": None}),
}


def test_the_contract_tests_are_all_here():
    """A new test in test_contract parametrised over the families' configs fails here until CONTRACT_TESTS runs it
    on the toy family too."""
    def over_configs(function) -> bool:
        return any(mark.name == "parametrize" and "config" in [n.strip() for n in mark.args[0].split(",")]
                   for mark in getattr(function, "pytestmark", []))

    parametrised = {name for name, function in vars(test_contract).items()
                    if name.startswith("test_") and over_configs(function)}
    assert parametrised == set(CONTRACT_TESTS)


def test_a_new_family_passes_the_contract_tests(diagonal, tmp_path):
    cases = examples(diagonal)
    by = {"by_layer": values(test_contract.cases_by_layer(cases)), "by_config": cases,
          "by_base": values(test_contract.cases_by_base(cases))}
    by["embedding"] = [(config, kind) for config, kind in by["by_layer"] if kind is nn.Embedding]
    assert {kind for _, kind in by["by_layer"]} == {nn.Linear, Conv1D}
    assert {base for _, base in by["by_base"]} == {"Linear", "Conv1D", "4bit", "8bit"}
    ran = 0
    for name, (which, others) in CONTRACT_TESTS.items():
        test = getattr(test_contract, name)
        for args in by[which]:
            grid = [{}]
            for option, choices in others.items():
                grid = [{**g, option: choice} for g in grid for choice in choices] if choices else grid
            for extra in grid:
                if "tmp_path" in others:
                    extra["tmp_path"] = tmp_path / f"{name}-{ran}"
                torch.manual_seed(0)  # as the autouse fixture seeds each collected test
                test(*args, **extra)
                ran += 1
    assert ran >= 40


#: seeds of test_round_trips.draw that fall on the toy family while it is registered (every fifth, from 1), enough
#: to give each of the four layer types it adapts two cases
ROUND_TRIP_SEEDS = range(1, 41, 5)


def test_a_new_family_passes_the_seeded_round_trips(diagonal, tmp_path):
    assert sorted(FAMILIES).index(FAMILY) == 1 and len(FAMILIES) == 5
    cases = [test_round_trips.draw(seed) for seed in ROUND_TRIP_SEEDS]
    assert {case["config"].family for case in cases} == {FAMILY}
    assert {case["kind"] for case in cases} == set(test_round_trips.supported_kinds(FAMILY))
    for i, case in enumerate(cases):
        test_round_trips.test_merge_then_unmerge(case)
        test_round_trips.test_save_then_load(case, tmp_path / str(i))
        for merge in (False, True):
            if not test_round_trips.base_state_refused(case):  # a 4-bit base cannot load its own state_dict
                test_round_trips.test_whole_model_state_dict(case, merge)
            test_round_trips.test_pickle(case, merge)


def test_a_new_family_saves_and_loads_through_the_public_api(diagonal, tmp_path):
    """adapt → train-like values → save_adapter → load_adapter onto the plain model: the same outputs, bit for bit;
    summary counts the family's layers; merge and unwrap fold it in."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8))
    model = perturb(boftlab.adapt(copy.deepcopy(plain), diagonal(alpha=0.5), targets=["0", "2"]))
    x = torch.randn(5, 16)
    boftlab.save_adapter(model, tmp_path)
    loaded = boftlab.load_adapter(copy.deepcopy(plain), tmp_path)
    assert torch.equal(loaded(x), model(x))
    family = boftlab.summary(loaded).by_family[FAMILY]
    assert (family["layers"], family["trainable"]) == (2, 16 + 8)  # min(24, 16) + min(8, 24) diagonal entries
    torch.testing.assert_close(boftlab.unwrap(loaded)(x), model(x), rtol=1e-6, atol=1e-6)


def test_the_bench_times_a_layer_of_every_family(diagonal):
    from boftlab.bench import layers

    methods = layers.method_list(sorted(FAMILIES))
    measured = layers.measure_layers(methods, dim=16, tokens=8, device=torch.device("cpu"), dtype=torch.float32,
                                     budget_s=0.0)
    timed = {m.key.split("-")[0] for m in measured}  # a method's key: its family, and e.g. "-m2" for BOFT's factors
    assert timed >= set(FAMILIES) and all(m.timing.ms > 0 for m in measured)


def test_the_reproduction_runner_gives_a_new_family_a_row_and_trains_it(diagonal):
    """Every domain's adapter rows include a registered family at its canonical example, and the runner trains it
    (a short run of the ci ViT task: its loss is finite and its validation metric moved)."""
    from boftlab.reproduce import vit
    from boftlab.reproduce.runner import run_method

    rows = [m for m in vit.DOMAIN.profile_methods("ci") if m.family == diagonal.family]
    assert len(rows) == 1 and rows[0].options == dict(diagonal.examples[0])
    task, _ = vit.make_task("ci", vit.Settings(steps=3, batch_size=16, eval_every=3))
    run = run_method(task, rows[0], progress=False)
    assert not run.skipped and all(math.isfinite(v) for v in run.losses) and len(run.losses) == 3
