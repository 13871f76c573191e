"""transformers ``Trainer`` integration: save the boftlab adapter (and, on request, the merged model) inside every
checkpoint the Trainer writes.

A checkpoint then holds what reloads exactly, each at its own cost. ``checkpoint-<step>/model.safetensors``, written by
the Trainer from the adapted model's ``state_dict``, holds the base tensors, the adapters and the merged flags — what
the model holds, no merged copy — so ``resume_from_checkpoint`` continues the run exactly. The plain class's
``from_pretrained(".../checkpoint-<step>")`` refuses it with a size mismatch (``AdapterLayer.plain_guard``): it never
loads the base model, or random weights, in silence. ``boftlab_adapter/`` holds the adapter alone, for
``boftlab.load_adapter`` onto a fresh base model; with ``merged=True``, ``boftlab_merged/`` holds the model with the
adapters folded in (``boftlab.save_merged``), which the plain class's ``from_pretrained`` loads exactly.
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

from .saving import save_adapter, save_merged

ADAPTER_DIR = "boftlab_adapter"
MERGED_DIR = "boftlab_merged"


class SaveAdapterCallback(TrainerCallback):
    """On each Trainer save, write ``<output_dir>/checkpoint-<step>/boftlab_adapter/`` (main process only), and with
    ``merged=True`` also ``checkpoint-<step>/boftlab_merged/`` (a whole plain model per checkpoint on disk, computed one
    layer at a time).

    Reload with ``boftlab.load_adapter(fresh_base_model, ".../checkpoint-<step>/boftlab_adapter")``, or
    ``PlainClass.from_pretrained(".../checkpoint-<step>/boftlab_merged")``.
    """

    def __init__(self, merged: bool = False) -> None:
        if not isinstance(merged, bool):
            raise ValueError(f"merged must be True or False, got {merged!r}")
        self.merged = merged

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.is_world_process_zero and model is not None:
            checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            save_adapter(model, os.path.join(checkpoint, ADAPTER_DIR))
            if self.merged:
                save_merged(model, os.path.join(checkpoint, MERGED_DIR))
        return control
