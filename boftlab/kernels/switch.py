"""The kernel switch (``KERNELS``, ``$BOFTLAB_KERNEL``) and the error that names it: a leaf that both the package
(``boftlab.kernels``, which re-exports them) and the Triton module import, so that neither imports the other upward.
Imports no Triton."""

from __future__ import annotations

import os

KERNELS = ("auto", "torch")
KERNEL_ENV = "BOFTLAB_KERNEL"


def kernel_in_force(configured: str) -> str:
    """``"torch"`` if ``$BOFTLAB_KERNEL`` is ``torch``, else ``configured``; ValueError for any other value. O(1)."""
    forced = os.environ.get(KERNEL_ENV, "auto")
    if forced not in KERNELS:
        raise ValueError(
            f"{KERNEL_ENV}={forced!r} is not a kernel setting; valid: {KERNELS} (torch forces the PyTorch path, "
            "auto or unset leaves the choice to each config)"
        )
    return "torch" if forced == "torch" else configured


class FusedKernelError(RuntimeError):
    """The fused kernel failed to compile or launch (a Triton/driver/GPU problem, not a bad argument)."""
