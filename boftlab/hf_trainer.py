"""transformers ``Trainer`` integration: save the boftlab adapter inside every checkpoint the Trainer writes.

A checkpoint then holds two things that reload exactly. ``checkpoint-<step>/model.safetensors``, written by the
Trainer from the adapted model's ``state_dict``, holds the base tensors, the adapters and, under the plain layer names,
the merged weights (``AdapterLayer.plain_state``): ``resume_from_checkpoint`` continues the run exactly, and the plain
class's ``from_pretrained(".../checkpoint-<step>")`` gives the fine-tuned model merged. ``boftlab_adapter/`` holds
the adapter alone, for ``boftlab.load_adapter`` onto a fresh base model.
"""

from __future__ import annotations

import os

try:
    from transformers import TrainerCallback
except ModuleNotFoundError as err:  # transformers is an optional dependency
    raise ImportError(
        "boftlab.SaveAdapterCallback plugs into the transformers Trainer, and transformers is not installed; "
        'install the notebooks extra: pip install "boftlab[notebooks]" (or pip install transformers)'
    ) from err

from .saving import save_adapter

ADAPTER_DIR = "boftlab_adapter"


class SaveAdapterCallback(TrainerCallback):
    """On each Trainer save, write ``<output_dir>/checkpoint-<step>/boftlab_adapter/`` (main process only).

    Reload with ``boftlab.load_adapter(fresh_base_model, ".../checkpoint-<step>/boftlab_adapter")``.
    """

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_adapter(model, os.path.join(checkpoint, ADAPTER_DIR))
        return control
