"""The fused Triton butterfly kernel equals the PyTorch path (boftlab.butterfly_structure.butterfly_apply), compiles
for real GPUs without one, and never fails silently.

Without a GPU the kernel runs in Triton's CPU interpreter, which must be chosen before Triton is first imported
(Triton jit-compiles its own standard library at import). If another module imported Triton first (PEFT, timm and
diffusers do), one test re-runs this file in a fresh process with TRITON_INTERPRET=1. With a GPU the same tests
run the compiled kernel on CUDA tensors. Skipped cleanly where Triton is absent.

Ahead-of-time compilation (``compile_ahead``) runs in a fresh process without the interpreter, for sm_75 (T4),
sm_80 and sm_90: a representative grid in CI, every supported (block_size, n_factors, dtype, direction) with
BOFTLAB_AOT_GRID=full (slow: see ``test_kernels_compile_ahead_of_time``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

if "triton" not in sys.modules and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before anything below imports Triton

import pytest  # noqa: E402

from boftlab.butterfly import BOFTConfig, cayley, skew_symmetric  # noqa: E402
from boftlab.butterfly_structure import butterfly_apply, gather_schedule  # noqa: E402
from boftlab.kernels import FusedKernelError, fused_available, fused_supported  # noqa: E402
from boftlab.kernels.butterfly_triton import MAX_SPAN_ELEMENTS, tile_shape, unsupported_reason  # noqa: E402

#: where the kernel runs in this process: "cuda", "cpu" (interpreter) or None (Triton was imported compiled)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None)

# (d, b, m): OFT, BOFT, d not a power of two, the densest m for b = 2 and b = 8, and the tl.dot path (b ≥ 16)
CASES = [(16, 2, 1), (32, 4, 2), (48, 4, 2), (64, 8, 3), (32, 8, 3), (64, 2, 6), (64, 16, 2), (64, 32, 2), (64, 64, 1)]
IDS = [f"d{d}-b{b}-m{m}" for d, b, m in CASES]


def random_blocks(d: int, b: int, m: int, seed: int = 0) -> torch.Tensor:
    """(m, d/b, b, b) orthogonal blocks far from the identity, so every factor matters."""
    generator = torch.Generator().manual_seed(seed)
    return cayley(skew_symmetric(torch.randn(m, d // b, b * (b - 1) // 2, generator=generator), b))


@pytest.fixture(scope="module")
def kernel():
    """boftlab.kernels.butterfly_triton, where its kernels can run in this process."""
    pytest.importorskip("triton")
    if KERNEL_DEVICE is None:
        pytest.skip("Triton was imported before TRITON_INTERPRET was set; test_in_fresh_interpreter_process runs these")
    from boftlab.kernels import butterfly_triton

    return butterfly_triton


def on_device(*tensors):
    return [None if t is None else t.to(KERNEL_DEVICE) for t in tensors]


# --- what the kernel supports (no Triton needed) ----------------------------------------------------------------
@pytest.mark.parametrize("d, b, m", CASES, ids=IDS)
def test_tile_covers_whole_butterfly_spans(d, b, m):
    rows, cols, dot = tile_shape(d, b, m)
    span = b * 2 ** (m - 1)
    assert cols % span == 0 and d % cols == 0
    assert rows & (rows - 1) == 0 and (rows >= 16 if dot else rows >= 1)
    assert dot == (b >= 16)


def test_unsupported_cases_give_reasons():
    assert unsupported_reason(48, 6, 1, torch.float32).startswith("block_size=6 is not supported")
    assert "dtype" in unsupported_reason(64, 8, 2, torch.float64)
    too_dense = unsupported_reason(4096, 8, 10, torch.float32)  # L·b = 4096·8 > 16384
    assert str(MAX_SPAN_ELEMENTS) in too_dense and "largest supported n_factors for block_size=8 is 9" in too_dense
    assert unsupported_reason(4096, 8, 9, torch.bfloat16) is None


def test_not_supported_on_cpu_tensors():
    assert not fused_supported(torch.randn(4, 64), random_blocks(64, 8, 2))
    assert not fused_available(torch.device("cpu"), 64, 8, 2, torch.float32)


def test_kernel_switch_from_config_and_environment(monkeypatch):
    linear = torch.nn.Linear(32, 8)
    monkeypatch.delenv("BOFTLAB_KERNEL", raising=False)
    assert BOFTConfig(block_size=4).make_layer(linear).kernel == "auto"
    assert BOFTConfig(block_size=4, kernel="torch").make_layer(linear).kernel == "torch"
    with pytest.raises(ValueError, match=r"kernel must be one of \('auto', 'torch'\), got 'triton'"):
        BOFTConfig(kernel="triton")
    monkeypatch.setenv("BOFTLAB_KERNEL", "torch")  # forces the PyTorch path on every layer built from now on
    assert BOFTConfig(block_size=4).make_layer(linear).kernel == "torch"
    monkeypatch.setenv("BOFTLAB_KERNEL", "auto")  # leaves the choice to each config
    assert BOFTConfig(block_size=4, kernel="torch").make_layer(linear).kernel == "torch"
    monkeypatch.setenv("BOFTLAB_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"BOFTLAB_KERNEL='fast' is not a kernel setting; valid: \('auto', 'torch'\)"):
        BOFTConfig(block_size=4).make_layer(linear)


# --- the kernel (interpreter on CPU, compiled on CUDA) ------------------------------------------------------------
def torch_path(gathers):
    """butterfly_apply with ``gathers`` bound: the PyTorch path with the fused entry's (x, blocks, transpose)."""
    return lambda x, blocks, transpose=False: butterfly_apply(x, blocks, gathers, transpose)


def gradients(apply, x, blocks, transpose, weight, needs=("x", "blocks")):
    """d/dx and d/dblocks of Σ weight ⊙ apply(x, blocks, transpose) (weight makes dL/dy a generic matrix)."""
    inputs = (x.clone().requires_grad_("x" in needs), blocks.clone().requires_grad_("blocks" in needs))
    (apply(*inputs, transpose).float() * weight).sum().backward()
    return [t.grad for t in inputs]


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d, b, m", CASES, ids=IDS)
def test_forward_matches_torch_path(kernel, d, b, m, transpose):
    x, blocks, *gathers = on_device(torch.randn(5, 3, d), random_blocks(d, b, m), *gather_schedule(d, b, m, transpose))
    fused = kernel.butterfly_apply_fused(x, blocks, transpose)
    torch.testing.assert_close(fused, butterfly_apply(x, blocks, gathers, transpose), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("d, b, m", CASES, ids=IDS)
def test_gradients_match_torch_path(kernel, d, b, m, transpose):
    x, blocks, weight, *gathers = on_device(
        torch.randn(7, d), random_blocks(d, b, m), torch.randn(7, d), *gather_schedule(d, b, m, transpose)
    )
    expected = gradients(torch_path(gathers), x, blocks, transpose, weight)
    fused = gradients(kernel.butterfly_apply_fused, x, blocks, transpose, weight)
    for e, f in zip(expected, fused):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-5)


def test_gradients_across_many_row_tiles(kernel):
    """200 rows: several row tiles per program, a partly masked last tile, partial block sums added up."""
    d, b, m = 64, 8, 3
    x, blocks, weight, *gathers = on_device(
        torch.randn(200, d), random_blocks(d, b, m), torch.randn(200, d), *gather_schedule(d, b, m, False)
    )
    expected = gradients(torch_path(gathers), x, blocks, False, weight)
    fused = gradients(kernel.butterfly_apply_fused, x, blocks, False, weight)
    for e, f in zip(expected, fused):
        torch.testing.assert_close(f, e, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("needs", ["x", "blocks"])
def test_gradient_of_one_input_only(kernel, needs):
    """Frozen blocks (dx by the reverse-direction forward kernel) or a frozen x (the weight path: only dQ)."""
    d, b, m = 32, 4, 2
    x, blocks, weight, *gathers = on_device(
        torch.randn(6, d), random_blocks(d, b, m), torch.randn(6, d), *gather_schedule(d, b, m, True)
    )
    expected = gradients(torch_path(gathers), x, blocks, True, weight, needs)
    fused = gradients(kernel.butterfly_apply_fused, x, blocks, True, weight, needs)
    index = 0 if needs == "x" else 1
    assert fused[1 - index] is None
    torch.testing.assert_close(fused[index], expected[index], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_drop_in_for_boft_layer_rotate(kernel, transpose):
    layer = BOFTConfig(block_size=4, n_factors=3, kernel="torch").make_layer(torch.nn.Linear(32, 8)).to(KERNEL_DEVICE)
    with torch.no_grad():
        layer.skew.normal_()
    x = torch.randn(4, 32, device=KERNEL_DEVICE)
    blocks = layer.orthogonal_blocks()
    fused = kernel.butterfly_apply_fused(x, blocks, transpose)
    torch.testing.assert_close(fused, layer.rotate(x, transpose, blocks), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, b, m", [(32, 4, 2), (64, 16, 2)], ids=["broadcast", "dot"])
def test_half_precision_forward_within_output_rounding(kernel, dtype, d, b, m):
    """fp32 accumulation: the error left is rounding y to the 16-bit dtype (plus TF32 products on the dot path)."""
    x, blocks, *gathers = on_device(
        torch.randn(40, d).to(dtype), random_blocks(d, b, m).to(dtype), *gather_schedule(d, b, m, False)
    )
    exact = butterfly_apply(x.float(), blocks.float(), gathers)
    fused = kernel.butterfly_apply_fused(x, blocks)
    assert fused.dtype == dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(fused.float(), exact, rtol=eps, atol=eps * exact.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d, b, m", [(32, 4, 2), (64, 16, 2)], ids=["broadcast", "dot"])
def test_half_precision_gradients_no_worse_than_torch_path(kernel, dtype, d, b, m):
    x, blocks, weight, *gathers = on_device(
        torch.randn(40, d).to(dtype), random_blocks(d, b, m).to(dtype), torch.randn(40, d),
        *gather_schedule(d, b, m, False),
    )
    exact = gradients(torch_path(gathers), x.float(), blocks.float(), False, weight)
    errors = {}
    for name, apply in (("torch", torch_path(gathers)), ("fused", kernel.butterfly_apply_fused)):
        grads = gradients(apply, x, blocks, False, weight)
        errors[name] = [(g.float() - e).abs().max().item() for g, e in zip(grads, exact)]
    eps = torch.finfo(dtype).eps
    for fused, torch_error, scale in zip(errors["fused"], errors["torch"], (1.0, 10.0)):
        assert fused <= 1.5 * torch_error + eps * scale, errors


def test_rejects_unsupported_block_size_with_choices(kernel):
    d, b = 36, 6
    x, blocks = on_device(torch.randn(2, d), random_blocks(d, b, 1))
    with pytest.raises(ValueError, match=r"supported block sizes: \[2, 4, 8, 16, 32, 64\]"):
        kernel.butterfly_apply_fused(x, blocks)


@pytest.mark.skipif(KERNEL_DEVICE is not None, reason="the kernel tests already ran in this process")
def test_in_fresh_interpreter_process():
    """Triton was imported (compiled mode) before this module: run this file again where it was not."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k", "not fresh"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0 and "passed" in summary and "skipped" not in summary, result.stdout[-4000:]


# --- a kernel that fails is an error that names the switch, never a silent fallback ------------------------------
class FailingLaunch:
    """Stands in for a Triton kernel whose compile or launch fails (``kernel[grid](*args)`` raises)."""

    def __getitem__(self, grid):
        def launch(*args, **constants):
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

        return launch


SWITCH = r"BOFTConfig\(kernel='torch'\).*BOFTLAB_KERNEL=torch"


def test_failing_launch_raises_naming_the_switch(monkeypatch):
    butterfly_triton = pytest.importorskip("boftlab.kernels.butterfly_triton")
    if butterfly_triton.triton is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setattr(butterfly_triton, "_forward_kernel", FailingLaunch())
    with pytest.raises(FusedKernelError, match="no kernel image.*" + SWITCH):
        butterfly_triton.butterfly_apply_fused(torch.randn(4, 32), random_blocks(32, 4, 2))


def test_failing_backward_launch_raises_naming_the_switch(kernel, monkeypatch):
    monkeypatch.setattr(kernel, "_backward_kernel", FailingLaunch())
    x, blocks = on_device(torch.randn(4, 32), random_blocks(32, 4, 2))
    y = kernel.butterfly_apply_fused(x.requires_grad_(True), blocks.requires_grad_(True))
    with pytest.raises(FusedKernelError, match=SWITCH):
        y.sum().backward()


@pytest.mark.parametrize("path", ["input", "assembled", "weight"])
def test_layer_with_failing_kernel_raises_and_the_switch_works(monkeypatch, path):
    """Where the fused kernel is taken (simulated here: CPU tensors reported as supported), a failing launch stops
    the forward with the error; kernel='torch' and BOFTLAB_KERNEL=torch run the PyTorch path instead."""
    butterfly_triton = pytest.importorskip("boftlab.kernels.butterfly_triton")
    if butterfly_triton.triton is None:
        pytest.skip("Triton is not installed")
    import boftlab.butterfly

    monkeypatch.setattr(boftlab.butterfly, "fused_supported", lambda rows, blocks: True)
    monkeypatch.setattr(butterfly_triton, "_forward_kernel", FailingLaunch())
    monkeypatch.delenv("BOFTLAB_KERNEL", raising=False)
    base, x = torch.nn.Linear(32, 2), torch.randn(64, 32)  # 2 rows of W: cheaper by the factors than assembled
    reference = BOFTConfig(block_size=4, n_factors=2, kernel="torch", path=path).make_layer(base)
    layer = BOFTConfig(block_size=4, n_factors=2, path=path).make_layer(base)
    if path == "assembled":  # the assembled form rotates with reshapes and a batched matmul: no kernel to fail
        torch.testing.assert_close(layer(x), reference(x))
    else:  # the input path rotates the activations, the weight path W's rows, with the kernel
        with pytest.raises(FusedKernelError, match=SWITCH):
            layer(x)
    monkeypatch.setenv("BOFTLAB_KERNEL", "torch")
    switched = BOFTConfig(block_size=4, n_factors=2, path=path).make_layer(base)
    torch.testing.assert_close(switched(x), reference(x))


# --- ahead-of-time compilation for real GPUs, on any machine ------------------------------------------------------
CAPABILITIES = (75, 80, 90)  # T4 (Colab's free GPU), A100, H100/H200
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compile_grid(full: bool) -> list[tuple[int, int, int, str, bool, list[bool]]]:
    """(capability, b, m, dtype, transpose, write_dx variants) to compile.

    CI: on every capability, the broadcast product (b = 8, m = 2) in every dtype and the tl.dot product (b = 16,
    m = 2) in one dtype each (T4's bf16 → TF32 dot included), forward and the backward that writes dx; x @ Rᵀ once.
    Full: every supported (b, m) × dtype × direction × capability, both backward variants."""
    from boftlab.kernels.butterfly_triton import BLOCK_SIZES, unsupported_reason

    if full:
        shapes = [(b, m) for b in BLOCK_SIZES for m in range(1, 14)
                  if unsupported_reason(b * 2 ** (m - 1), b, m, torch.float32) is None]
        return [(cc, b, m, dt, t, [True, False])
                for cc in CAPABILITIES for b, m in shapes for dt in DTYPE_NAMES for t in (False, True)]
    grid = [(cc, 8, 2, dt, False, [True]) for cc in CAPABILITIES for dt in DTYPE_NAMES]
    grid += [(cc, 16, 2, dt, False, [True]) for cc, dt in zip(CAPABILITIES, ("bf16", "fp16", "fp32"))]
    return grid + [(90, 8, 2, "fp32", True, [True])]


COMPILE_SCRIPT = """
import json, sys, time, torch
from boftlab.kernels.butterfly_triton import compile_ahead
for cc, b, m, dtype, transpose, write_dx in json.loads(sys.argv[1]):
    start = time.perf_counter()
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    kernels = compile_ahead(cc, 4 * b * 2 ** (m - 1), b, m, dt, transpose, tuple(write_dx))
    assert len(kernels) == 1 + len(write_dx) and all(k.asm.get("cubin") for k in kernels), (cc, b, m, dtype)
    print(json.dumps([cc, b, m, dtype, transpose, round(time.perf_counter() - start, 2)]), flush=True)
"""


def test_kernels_compile_ahead_of_time(tmp_path):
    """Forward and backward kernels compile to GPU binaries (cubin) for sm_75/80/90 on this machine, GPU or not.

    Runs in a fresh process: the interpreter (TRITON_INTERPRET) replaces the kernels by Python functions, and a fresh
    Triton cache makes it compile for real. The CI grid takes about a minute on a 2-core CPU; the full grid
    (BOFTLAB_AOT_GRID=full) takes hours: deep unrolls (m ≥ 6) spend minutes each in ptxas.
    """
    pytest.importorskip("triton")
    grid = compile_grid(full=os.environ.get("BOFTLAB_AOT_GRID") == "full")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    import json

    result = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(grid)], env=env, capture_output=True,
                            text=True, timeout=None if len(grid) > 100 else 900)
    compiled = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert result.returncode == 0 and len(compiled) == len(grid), result.stderr[-4000:]
