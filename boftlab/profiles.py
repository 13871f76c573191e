"""Run profiles for notebooks and ``python -m boftlab reproduce``.

``ci``:    offline, CPU, minutes — models the project ships or that install with pip, bundled data sets.
``colab``: the papers' model families from the Hugging Face hub, on a GPU.
"""

from __future__ import annotations

import logging
import os
import socket

import torch

PROFILES = ("ci", "colab")
#: the loggers through which bitsandbytes reports its hub-kernel lookup: on a CPU with AVX512-BF16, importing it (as
#: PEFT does) asks the Hugging Face hub for a faster 4-bit CPU kernel, which offline can only fail, in two lines of
#: stderr ("Skipping publisher trust check …", "Failed to load CPU gemm_4bit_forward …")
HUB_KERNEL_LOGGERS = ("bitsandbytes.backends.cpu.ops", "kernels")


def hub_reachable(host: str = "huggingface.co", timeout: float = 2.0) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def default_profile() -> str:
    """``$BOFTLAB_PROFILE`` if set; otherwise ``colab`` when a GPU and the hub are both reachable, else ``ci``.

    The hub is only probed when a GPU is present, so CPU machines (CI) never touch the network. The ci profile runs
    offline, so it also turns off the reports of bitsandbytes' hub-kernel lookup (``offline_kernels``).
    """
    chosen = os.environ.get("BOFTLAB_PROFILE")
    if chosen is not None:
        if chosen not in PROFILES:
            raise ValueError(f"BOFTLAB_PROFILE={chosen!r}; valid profiles: {PROFILES}")
    else:
        chosen = "colab" if torch.cuda.is_available() and hub_reachable() else "ci"
    if chosen == "ci":
        offline_kernels()
    return chosen


def offline_kernels() -> None:
    """Raise ``HUB_KERNEL_LOGGERS`` to ERROR: offline, bitsandbytes' lookup of a hub kernel can only fail, and it then
    uses its own CPU kernel, so its warnings tell a student nothing to act on. Call before bitsandbytes is imported."""
    for name in HUB_KERNEL_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
