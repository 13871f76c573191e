"""boftlab: structured parameter-efficient fine-tuning — butterfly-orthogonal (BOFT/OFT), structured
unrestricted-rank (SURM) and tensor-core (FLoRA) adapters behind one adapter contract.

``import boftlab`` loads torch and the adapters only. The family helpers (structured matrices, Tucker algebra) are
reached through their modules — ``boftlab.butterfly``, ``boftlab.surm``, ``boftlab.tensor_core`` — and the heavier
submodules load on first use: ``boftlab.teaching`` (notebook figures and widgets), ``boftlab.counts`` (parameter
counts on real architectures), ``boftlab.reproduce``, ``boftlab.bench``, ``boftlab.profiles``, and
``boftlab.SaveAdapterCallback`` (needs transformers).
"""

import importlib
from typing import Any

from ._version import __version__
from .contract import FAMILIES, AdapterConfig, AdapterLayer
from .butterfly import BOFTConfig, BOFTLayer, OFTConfig
from .surm import SURMAdapterLayer, SURMConfig, SURMLayer
from .tensor_core import TensorCoreConfig, TensorCoreLayer
from .model import adapt, adapter_layers, dequantize_bases, disabled, merge, summary, unmerge, unwrap
from .saving import load_adapter, save_adapter, save_merged
from .checkpoints import load_checkpoint, save_checkpoint
from .peft_interop import from_peft, to_peft

__all__ = [
    # the contract
    "AdapterConfig", "AdapterLayer", "FAMILIES",
    # the families
    "BOFTConfig", "OFTConfig", "BOFTLayer",
    "SURMConfig", "SURMLayer", "SURMAdapterLayer",
    "TensorCoreConfig", "TensorCoreLayer",
    # models
    "adapt", "adapter_layers", "summary", "merge", "unmerge", "unwrap", "disabled", "dequantize_bases",
    # files
    "save_adapter", "load_adapter", "save_merged", "save_checkpoint", "load_checkpoint", "from_peft", "to_peft",
]
# also public, loaded on first use and left out of __all__ so that ``from boftlab import *`` never needs transformers:
# boftlab.SaveAdapterCallback, the Hugging Face Trainer integration

#: submodules the adapters do not need (teaching code, counts on real architectures, experiments): loaded when touched
LAZY_SUBMODULES = ("teaching", "counts", "reproduce", "bench", "profiles")


def __getattr__(name: str) -> Any:
    if name in LAZY_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "SaveAdapterCallback":
        from .hf_trainer import SaveAdapterCallback

        return SaveAdapterCallback
    raise AttributeError(f"module 'boftlab' has no attribute {name!r}")

