"""The methods a reproduction compares: a ``Method`` (one row of a results table), the seven adapter rows every domain
shares (``adapter_methods``), and ``prepare``, which puts a method on a model and leaves only its parameters trainable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..base_layers import keep_unpacked, kind
from ..contract import FAMILIES


#: the references a method can name besides boftlab's families (``contract.FAMILIES``)
REFERENCES = ("head", "full", "lora", "c3a")
#: PEFT C3A's learning rate before the protocol's grid: PEFT's documentation calls 1e-1 "a good starting point" for C3A
C3A_LR = 1e-1


def method_families() -> tuple[str, ...]:
    """What ``Method.family`` can be: the references, then every boftlab family."""
    return (*REFERENCES, *FAMILIES)


@dataclass(frozen=True)
class Method:
    """One row of a results table.

    family: "head" (only the modules kept trainable), "full" (every parameter), "lora" / "c3a" (PEFT ``LoraConfig`` /
    ``C3AConfig``, its block size by default ``peft_interop.c3a_block_size`` of the targets) or a
    boftlab family (``contract.FAMILIES``); options: that config's keyword arguments; targets: the layers it adapts
    (a regex that ``fullmatch``-es module names, or a list of names / suffixes / module types); lr: AdamW's peak
    learning rate.
    """

    name: str
    family: str
    options: dict[str, Any] = field(default_factory=dict)
    targets: Any = None
    lr: float = 1e-3

    def __post_init__(self) -> None:
        if self.family not in method_families():
            raise ValueError(
                f"Method {self.name!r}: unknown family {self.family!r}; valid families: {method_families()}"
            )
        if self.family not in ("head", "full") and self.targets is None:
            raise ValueError(f"Method {self.name!r}: family {self.family!r} needs targets (the layers to adapt)")


def adapter_methods(targets: Any, lr: float, lora_rank: int, oft_block_size: int, flora_ranks: int,
                    lora_alpha: int | None = None, orthogonal_lr: float | None = None,
                    flora_targets: Any = None, flora_name: str = "FLoRA (tensor core)") -> list[Method]:
    """The adapter rows every domain compares (eight, plus ``family_rows`` for any family registered since), on the same ``targets``: PEFT LoRA (rank ``lora_rank``, alpha
    ``lora_alpha`` or 2·rank), OFT (``oft_block_size``), BOFT b=8 m=2 and b=4 m=4, SURM circulant and Kronecker
    (LoRA-style), FLoRA (``flora_ranks`` per mode; ``flora_targets`` if it adapts more layers), PEFT C3A (block size
    the gcd of the targeted layers' sizes: SURM circulant's parameter count where one size divides the other; lr
    ``C3A_LR``). ``lr`` is AdamW's peak learning rate, ``orthogonal_lr`` OFT's and BOFT's where it differs."""
    rotation_lr = lr if orthogonal_lr is None else orthogonal_lr
    alpha = 2 * lora_rank if lora_alpha is None else lora_alpha
    return [
        Method(f"LoRA r={lora_rank} (PEFT)", "lora", {"r": lora_rank, "lora_alpha": alpha}, targets, lr),
        Method(f"OFT b={oft_block_size}", "oft", {"block_size": oft_block_size}, targets, rotation_lr),
        Method("BOFT b=8 m=2", "boft", {"block_size": 8, "n_factors": 2}, targets, rotation_lr),
        Method("BOFT b=4 m=4", "boft", {"block_size": 4, "n_factors": 4}, targets, rotation_lr),
        Method("SURM circulant", "surm", {"structure": "circulant", "mode": "lora"}, targets, lr),
        Method("SURM Kronecker", "surm", {"structure": "kronecker", "mode": "lora"}, targets, lr),
        Method(flora_name, "tensor_core", {"ranks": flora_ranks}, flora_targets or targets, lr),
        Method("C3A (PEFT)", "c3a", {}, targets, C3A_LR),
        *family_rows(("oft", "boft", "surm", "tensor_core"), targets, lr),
    ]


def family_rows(listed: tuple[str, ...], targets: Any, lr: float) -> list[Method]:
    """One row for every family in ``FAMILIES`` that ``listed`` does not name, at its canonical example (the first of
    its config's ``examples``): a newly registered family is reproduced with no edit here."""
    rows = []
    for family, cls in FAMILIES.items():
        if family not in listed:
            cls.example_configs()  # a family that declares no examples is refused here, by name
            options = dict(cls.examples[0])
            label = ", ".join(f"{k}={v}" for k, v in options.items())
            rows.append(Method(f"{cls.__name__} ({label})", family, options, targets, lr))
    return rows


class MethodUnavailable(RuntimeError):
    """A method this run cannot apply — it needs a package this installation lacks (PEFT, for LoRA), or it would train
    weights the model stores quantized (full fine-tuning of a 4-bit model); the run lists it as skipped."""


def prepare(model: nn.Module, method: Method, trainable: list[str]) -> nn.Module:
    """Put ``method`` on ``model`` (in place, or PEFT's wrapper around it); only the method's parameters and the
    ``trainable`` modules (e.g. a new head) require gradients afterwards."""
    if method.family == "full" and quantized_layers(model):
        raise MethodUnavailable(
            f"full fine-tuning trains every weight, and {len(quantized_layers(model))} layers of this model store "
            "theirs quantized (bitsandbytes), which no optimizer can update; load the model in 16 bits to train it "
            "fully")
    keep_unpacked(model)  # every method: a 4-bit layer repacked at an evaluation would drop its input gradient
    if method.family in ("head", "full"):
        for name, p in model.named_parameters():
            p.requires_grad_(method.family == "full" or any(_in_module(name, t) for t in trainable))
        return model
    if method.family in ("lora", "c3a"):
        try:
            from peft import C3AConfig, LoraConfig, get_peft_model
        except ImportError as err:
            raise MethodUnavailable(f"PEFT is not importable here ({err}); pip install peft") from err

        options = dict(target_modules=method.targets, modules_to_save=list(trainable) or None, **method.options)
        if method.family == "c3a" and "block_size" not in options:
            from ..peft_interop import c3a_block_size

            try:
                options["block_size"] = c3a_block_size(model, method.targets)
            except ValueError as err:  # C3A adapts plain nn.Linear layers only
                raise MethodUnavailable(str(err)) from err
        config = (LoraConfig if method.family == "lora" else C3AConfig)(**options)
        with warnings.catch_warnings():  # PEFT reads an attribute transformers ≥ 5.24 deprecates: not ours to fix
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    from ..model import adapt

    return adapt(model, FAMILIES[method.family](**method.options), targets=method.targets, trainable=trainable)


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of ``model``'s bitsandbytes quantized linear layers (Linear4bit / Linear8bitLt)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and kind(m) == "quantized"]


def _in_module(param_name: str, module_name: str) -> bool:
    return param_name.startswith(module_name + ".") or f".{module_name}." in f".{param_name}"


def count_parameters(model: nn.Module, trainable: list[str]) -> tuple[int, int]:
    """(trainable parameters, of which outside the ``trainable`` modules — i.e. the method's own)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kept = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.requires_grad and any(_in_module(name, t) for t in trainable)
    )
    return total, total - kept
