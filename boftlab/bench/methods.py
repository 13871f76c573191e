"""The methods the bench compares — one list for every suite, built from ``contract.FAMILIES``.

References (PEFT): LoRA r=8, OFT b=8, BOFT m=2 b=8 (on a CPU with the ``torch.block_diag`` patch, see
``peft_boft_context``) and C3A with the block size ``peft_interop.c3a_block_size`` gives (one circulant block on a
square layer: as many parameters as SURM's circulant). boftlab: every family registered in ``FAMILIES``, configured
as ``HEADLINE`` says where the issue's goals name one configuration (b = 8 like PEFT's rows), else with its canonical
example (``AdapterConfig.example_configs()[0]``) — so a new family is benchmarked by every suite with no edit here.

Each method adapts either one bare layer (``targets=None``: the adapted layer is returned) or the layers ``targets``
selects in a model (PEFT's suffix / regex matching; boftlab's ``adapt``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from . import with_peft
from .. import model as boftlab_model
from ..contract import FAMILIES, AdapterConfig
from ..kernels import triton_available

LORA_RANK = 8
BLOCK_SIZE = 8

#: family -> (label, options) where the issue's goals name one configuration; other families: their first example
HEADLINE = {
    "oft": (f"boftlab OFT b={BLOCK_SIZE}", dict(block_size=BLOCK_SIZE)),
    "boft": (f"boftlab BOFT m=2 b={BLOCK_SIZE}", dict(block_size=BLOCK_SIZE, n_factors=2, kernel="torch")),
}
#: the PEFT methods every comparison is measured against, in table order
REFERENCES = ("lora", "peft_oft", "peft_boft", "c3a")


@contextlib.contextmanager
def peft_boft_context(device: torch.device) -> Iterator[str]:
    """PEFT's real m-factor BOFT: its CUDA extension if it builds, else the torch.block_diag patch. Yields a label."""
    from peft.tuners.boft import layer

    if device.type == "cuda" and layer.get_fbd_cuda() is not None:
        yield "fbd_cuda"
        return
    from .peft_patch import peft_boft_without_cuda

    with peft_boft_without_cuda():
        yield "block_diag patch"


Apply = Callable[[nn.Module, "list[str] | None"], nn.Module]


@dataclass
class Method:
    """One row of a bench table: the key its goals refer to, its label, how it adapts a layer or a model, and a
    context to build and time it in (e.g. PEFT's BOFT without its CUDA extension)."""

    key: str
    label: str
    apply: Apply  # (module, targets) -> adapted; targets None: ``module`` is the one layer to adapt
    context: Callable[[torch.device], contextlib.AbstractContextManager] | None = None


def _peft(config_name: str, **options) -> Apply:
    return lambda module, targets: with_peft(config_name, module, targets, **options)


def _c3a(module: nn.Module, targets: list[str] | None) -> nn.Module:
    from ..peft_interop import c3a_block_size

    block_size = c3a_block_size(module, targets)
    return with_peft("C3AConfig", module, targets, block_size=block_size)


def _boftlab(config: AdapterConfig) -> Apply:
    def apply(module: nn.Module, targets: list[str] | None) -> nn.Module:
        return config.make_layer(module) if targets is None else boftlab_model.adapt(module, config, targets)

    return apply


def reference(key: str) -> Method:
    """The PEFT method ``key`` (one of ``REFERENCES``)."""
    if key == "lora":
        return Method(key, f"PEFT LoRA r={LORA_RANK}", _peft("LoraConfig", r=LORA_RANK))
    if key == "peft_oft":
        return Method(key, f"PEFT OFT b={BLOCK_SIZE}", _peft("OFTConfig", oft_block_size=BLOCK_SIZE))
    if key == "peft_boft":
        return Method(key, f"PEFT BOFT m=2 b={BLOCK_SIZE}",
                      _peft("BOFTConfig", boft_block_size=BLOCK_SIZE, boft_n_butterfly_factor=2), peft_boft_context)
    if key == "c3a":
        return Method(key, "PEFT C3A (block = gcd of the layer sizes)", _c3a)
    raise ValueError(f"unknown reference {key!r}; valid: {REFERENCES}")


def family(name: str) -> Method:
    """boftlab's family ``name`` (a key of ``FAMILIES``) as the bench configures it (``HEADLINE`` or its first
    example); key: the family name, ``boft-m2`` for BOFT (the goals' key)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; registered: {sorted(FAMILIES)}")
    if name in HEADLINE:
        label, options = HEADLINE[name]
        config = FAMILIES[name](**options)
    else:
        config = FAMILIES[name].example_configs()[0]
        options = FAMILIES[name].examples[0]
        label = f"boftlab {name} " + ", ".join(f"{k}={v}" for k, v in options.items())
    return Method("boft-m2" if name == "boft" else name, label, _boftlab(config))


def boft(n_factors: int, fused: bool = False) -> Method:
    """boftlab BOFT b=8 with ``n_factors`` factors, on the PyTorch path or (``fused``) the Triton kernel."""
    from ..butterfly import BOFTConfig

    config = BOFTConfig(block_size=BLOCK_SIZE, n_factors=n_factors, kernel="auto" if fused else "torch")
    label = f"boftlab BOFT m={n_factors} b={BLOCK_SIZE}" + (" (fused kernel)" if fused else "")
    return Method(f"boft{'_fused' if fused else ''}-m{n_factors}", label, _boftlab(config))


def all_methods(device: torch.device, references: Sequence[str] = REFERENCES) -> list[Method]:
    """``references``, then every family of ``FAMILIES``, then (CUDA with Triton) BOFT m=2 on the fused kernel."""
    methods = [reference(key) for key in references] + [family(name) for name in FAMILIES]
    if device.type == "cuda" and triton_available():
        methods.append(boft(2, fused=True))
    return methods
