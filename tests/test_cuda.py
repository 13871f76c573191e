"""On a CUDA GPU every family equals the same adapter on the CPU — forward, gradients and merge, in fp32, bf16 and
fp16 — and BOFT does on every path, with the fused kernel and with the PyTorch path.

Marked ``gpu``: skipped without a GPU (tests/conftest.py); ``scripts/gpu_check.sh`` runs this file on one. The CPU
reference is computed in fp32 from the same values the GPU layer holds (its 16-bit base weights and inputs, upcast), so
what is compared is the GPU's arithmetic: tolerances are a few units of the dtype's rounding (``TOLERANCE``), and fp32
runs without TF32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import boftlab
from boftlab.contract import FAMILIES
from helpers import family_examples, perturb


#: every example of every registered family, and BOFT on another fused-kernel block size and on one the kernel lacks
#: (b = 6): its CUDA kernel is the one thing here no other family has
CONFIGS = [config for _, config in family_examples()] + [
    boftlab.BOFTConfig(block_size=8, n_factors=3),
    boftlab.BOFTConfig(block_size=6, n_factors=2),
]
LAYERS = {
    nn.Linear: (lambda: nn.Linear(96, 24), lambda: torch.randn(5, 96)),
    nn.Conv2d: (lambda: nn.Conv2d(24, 6, 2, padding=1), lambda: torch.randn(2, 24, 5, 5)),  # fan-in 96
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: relative to the largest reference value: fp32 without TF32; 16-bit: a few units of rounding (eps 2⁻⁸, 2⁻¹¹)
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 6e-2, torch.float16: 8e-3}
CASES = [pytest.param(config, kind, id=f"{config.display_name()}-{config.family}-{i}-{kind.__name__}")
         for i, config in enumerate(CONFIGS) for kind in LAYERS if kind in config.supported_layers()]


def test_every_family_has_a_cuda_case():
    """Runs everywhere: every registered family is here through its own examples."""
    assert {config.family for config in CONFIGS} == set(FAMILIES)


@pytest.fixture
def exact_fp32():
    """No TF32 in cuBLAS/cuDNN while a test runs (PyTorch enables it for convolutions by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def trained_pair(config, kind, dtype):
    """(the layer on CUDA in ``dtype``, its CPU fp32 twin holding the same values, an input in ``dtype`` on CUDA)."""
    torch.manual_seed(0)
    make_base, make_input = LAYERS[kind]
    base = make_base().to(dtype)  # 16-bit weights rounded once, shared by both sides
    layer = perturb(config.make_layer(base))
    reference = copy.deepcopy(layer).float()
    return layer.cuda(), reference, make_input().to(dtype).cuda()


def forward_and_gradients(layer, x):
    x = x.detach().requires_grad_(True)
    y = layer(x)
    weights = torch.linspace(-1, 2, y.numel(), device=y.device).reshape(y.shape)
    params = [x, *layer.adapter_parameters().values()]
    grads = torch.autograd.grad((y.float() * weights).sum(), params)
    return [t.float().cpu() for t in (y, *grads)]


def assert_close_to(got, want, dtype, scale=1.0):
    tol = scale * TOLERANCE[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(want.abs().max().item(), 1e-6))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,kind", CASES)
def test_forward_and_gradients_equal_cpu(config, kind, dtype, exact_fp32):
    layer, reference, x = trained_pair(config, kind, dtype)
    got = forward_and_gradients(layer, x)
    want = forward_and_gradients(reference, x.float().cpu())
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to(g, w, dtype, scale=1.0 if i == 0 else 2.0)  # gradients: one more rounding of dL/dy


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config,kind", CASES)
def test_merge_on_cuda_equals_the_unmerged_layer(config, kind, dtype, exact_fp32):
    layer, _, x = trained_pair(config, kind, dtype)
    original = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x).float()
        layer.merge()
        assert_close_to(layer(x).float().cpu(), unmerged.cpu(), dtype, scale=2.0)
        layer.unmerge()
    assert_close_to(layer.base_layer.weight.float().cpu(), original.float().cpu(), dtype, scale=2.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", ["auto", "torch"])
@pytest.mark.parametrize("path", ["input", "assembled", "weight"])
@pytest.mark.parametrize("kind", list(LAYERS), ids=lambda k: k.__name__)
def test_boft_every_path_and_kernel_equals_cpu(path, kernel, kind, dtype, exact_fp32):
    config = boftlab.BOFTConfig(block_size=8, n_factors=2, path=path, kernel=kernel)
    layer, reference, x = trained_pair(config, kind, dtype)
    got = forward_and_gradients(layer, x)
    want = forward_and_gradients(reference, x.float().cpu())
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close_to(g, w, dtype, scale=1.0 if i == 0 else 2.0)


@pytest.mark.gpu
def test_fused_kernel_is_taken_automatically_on_cuda():
    """kernel="auto" on CUDA: the factored rotation runs the fused kernel, and the cost model prices it so."""
    pytest.importorskip("triton")
    from boftlab.kernels import fused_supported

    layer = boftlab.BOFTConfig(block_size=8, n_factors=2).make_layer(nn.Linear(64, 64)).cuda()
    x = torch.randn(512, 64, device="cuda")
    assert fused_supported(x, layer.orthogonal_blocks())
    assert layer.rotation_costs(512, x.dtype)["factored"] == 512 * 64 * 2 * 8  # m·b per element, on chip
    with torch.enable_grad():
        assert layer.choose_path(x.requires_grad_(True)) == "input"
