"""torch.compile of adapted models: one graph (no breaks) for every family, same outputs and gradients as eager.

CI compiles with backend="aot_eager": dynamo's full graph capture and AOTAutograd's joint forward/backward graph —
everything except inductor's C++ code generation, which takes 1–2 minutes on a 2-core CPU. The inductor backend
(torch.compile's default) is checked too when BOFTLAB_SLOW_TESTS=1; measured on this CPU it matches eager to 6e-8
(outputs) and 4e-10 (gradients).
"""

import os

import pytest
import torch
from torch import nn

import boftlab
from helpers import family_examples, perturb

BACKENDS = ["aot_eager"] + (["inductor"] if os.environ.get("BOFTLAB_SLOW_TESTS") == "1" else [])


def adapted_model():
    """One Linear per example of every registered family (the configs each declares next to itself), and a head."""
    torch.manual_seed(0)
    configs = [config for _, config in family_examples()]
    layers = []
    for _ in configs:
        layers += [nn.Linear(32, 32), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(32, 4))
    head = str(len(model) - 1)
    for i, config in enumerate(configs):
        boftlab.adapt(model, config, targets=[str(2 * i)], trainable=[head] if i == 0 else ())
    return perturb(model)  # away from the identity, so that a wrong graph would show


@pytest.fixture(scope="module", params=BACKENDS)
def compiled(request):
    model = adapted_model()
    return model, torch.compile(model, backend=request.param, fullgraph=True)  # fullgraph: a break is an error


def test_compiled_forward_and_gradients_equal_eager(compiled):
    model, fast = compiled
    x = torch.randn(16, 32)
    fast(x).square().mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    eager = model(x)
    eager.square().mean().backward()
    torch.testing.assert_close(fast(x), eager, rtol=0, atol=1e-5)
    assert len(compiled_grads) > 8
    for name, grad in compiled_grads.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, rtol=0, atol=1e-5)
    model.zero_grad()


def test_compiled_training_step_then_merge(compiled):
    """Parameters updated in place and the merged flag flipping must not leave a stale graph behind."""
    model, fast = compiled
    x = torch.randn(16, 32)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = fast(x).detach()
    fast(x).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = fast(x)
        assert (after - before).abs().max() > 1e-4
        torch.testing.assert_close(after, model(x), rtol=0, atol=1e-5)
        boftlab.merge(model)
        torch.testing.assert_close(fast(x), after, rtol=1e-4, atol=1e-5)
        boftlab.unmerge(model)
        torch.testing.assert_close(fast(x), after, rtol=1e-4, atol=1e-5)


def test_adapter_saved_from_compiled_model_loads_into_plain_model(tmp_path):
    model = adapted_model()
    boftlab.save_adapter(torch.compile(model, backend="aot_eager"), tmp_path)
    plain = adapted_model()
    boftlab.unwrap(plain)
    boftlab.load_adapter(plain, tmp_path)
    # the compiled model's own (trained, non-identity) values, bit for bit: a load that copied nothing fails
    loaded, saved = boftlab.saving.adapter_state(plain), boftlab.saving.adapter_state(model)
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_disabled_under_compile_runs_the_base_and_then_the_adapters_again():
    """The switch is an attribute the compiled graph is guarded on: entering and leaving recompile, never go stale."""
    model = adapted_model()
    fast = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 32)
    with torch.no_grad():
        adapted = fast(x)
        with boftlab.disabled(fast):
            off = fast(x)
        torch.testing.assert_close(fast(x), adapted, rtol=0, atol=0)
    base = nn.Sequential(*[m.base_layer if isinstance(m, boftlab.AdapterLayer) else m for m in model])
    torch.testing.assert_close(off, base(x), rtol=0, atol=1e-6)
    assert not torch.allclose(off, adapted)


def test_hot_swap_under_compile_needs_no_recompilation(tmp_path):
    """load_adapter copies into the same parameter objects, so the compiled graph stays valid and is reused."""
    from torch._dynamo.testing import CompileCounter

    other = perturb(adapted_model(), scale=0.2)
    boftlab.save_adapter(other, tmp_path)
    model = adapted_model()
    counter = CompileCounter()
    fast = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(8, 32)
    with torch.no_grad():
        fast(x)
        frames = counter.frame_count
        boftlab.load_adapter(fast, tmp_path)
        torch.testing.assert_close(fast(x), other(x), rtol=0, atol=1e-6)
    assert counter.frame_count == frames == 1


@pytest.mark.slow  # three dynamic-shape compilations: 4-19 s on a loaded 2-core CPU
def test_dynamic_shapes_compile_in_one_graph():
    """Under dynamic shapes the auto path's costs are symbolic: choosing between them must not break the graph (it
    guards on the shape instead), whatever the batch size. Each cost regime the sizes cross is one compilation; the
    earlier tests' compilations of the same code count towards dynamo's recompile limit too, so they are cleared."""
    torch._dynamo.reset()
    model = adapted_model()
    fast = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for rows in (8, 16, 3000):  # 3000 rows: the weight path is cheaper for BOFT, the input path below
            x = torch.randn(rows, 32)
            torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-5)
