"""Run profiles for notebooks and ``python -m boftlab reproduce``.

``ci``:    offline, CPU, minutes — models the project ships or that install with pip, bundled data sets.
``colab``: the papers' model families from the Hugging Face hub, on a GPU.
"""

from __future__ import annotations

import os
import socket

import torch

PROFILES = ("ci", "colab")


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def default_profile() -> str:
    """``$BOFTLAB_PROFILE`` if set; otherwise ``colab`` when a GPU and the hub are both reachable, else ``ci``.

    The hub is only probed when a GPU is present, so CPU machines (CI) never touch the network.
    """
    chosen = os.environ.get("BOFTLAB_PROFILE")
    if chosen is not None:
        if chosen not in PROFILES:
            raise ValueError(f"BOFTLAB_PROFILE={chosen!r}; valid profiles: {PROFILES}")
        return chosen
    return "colab" if torch.cuda.is_available() and hub_reachable() else "ci"
