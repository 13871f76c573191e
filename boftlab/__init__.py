"""boftlab: structured parameter-efficient fine-tuning — butterfly-orthogonal (BOFT/OFT), structured
unrestricted-rank (SURM) and tensor-core (FLoRA) adapters behind one adapter contract."""

__version__ = "0.1.0"

from .contract import FAMILIES, AdapterConfig, AdapterLayer
from .butterfly import BOFTConfig, BOFTLayer, OFTConfig
from .model import adapt, adapter_layers, merge, summary, unmerge, unwrap
from .saving import load_adapter, save_adapter
from .peft_interop import from_peft, to_peft


def __getattr__(name: str):
    # transformers is slow to import; load the Trainer integration only when it is asked for
    if name == "SaveAdapterCallback":
        from .hf_trainer import SaveAdapterCallback

        return SaveAdapterCallback
    raise AttributeError(f"module 'boftlab' has no attribute {name!r}")
from .surm import SURMAdapterLayer, SURMConfig, SURMLayer, StructuredMatrix, approximation_error, displacement_rank
from .tensor_core import TensorCoreConfig, TensorCoreLayer, mode_product, tucker_delta, tucker_dimension, tucker_n_params
from .checkpoints import load_checkpoint, save_checkpoint
from . import counts, expressivity, figures
