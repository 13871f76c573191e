"""Mixed precision and gradient checkpointing with every family, on CPU.

CPU autocast covers bf16 and fp16 in this torch; fp16 *training* at scale needs a GPU and a GradScaler (accelerate's
``--mixed_precision fp16`` adds it), which CPU tests cannot show. What the tests pin down: parameters stay fp32, the
loss is finite and falls, the adapted output under autocast matches fp32 to the half-precision rounding, and the
parts that lose too many digits in half precision run in fp32 — BOFT's orthogonal blocks, SURM's FFTs.
"""

import pytest
import torch
from torch import nn

import boftlab
from boftlab import BOFTConfig, SURMConfig
from helpers import LAYERS, canonical_configs, config_id, family_examples, perturb

#: every example of every registered family (the configs each family declares next to itself)
CASES = [pytest.param(config, id=config_id(config)) for _, config in family_examples()]
#: BOFT with its Neumann-series Cayley transform, which no example uses: its blocks are computed another way
NEUMANN = BOFTConfig(block_size=4, n_factors=2, neumann_terms=5)
DTYPES = [torch.bfloat16, torch.float16]
HALF_TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def adapted(config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))
    return boftlab.adapt(model, config, targets=["0", "2"], trainable=["4"])


def data():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(64, 32, generator=generator), torch.randint(0, 4, (64,), generator=generator)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CASES)
def test_autocast_training(config, dtype):
    model = adapted(config)
    x, y = data()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=dtype):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y)
        assert logits.dtype == dtype  # the matmuls really ran in half precision
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    layer_params = [n for n in start if not n.startswith("4.")]
    assert all(not torch.equal(model.get_parameter(n), start[n]) for n in layer_params)  # every adapter trained


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", CASES)
def test_autocast_output_matches_fp32(config, dtype):
    model = perturb(adapted(config))
    x, _ = data()
    with torch.no_grad():
        full = model(x)
        with torch.autocast("cpu", dtype=dtype):
            half = model(x)
    scale = full.abs().max().item()
    assert (half.float() - full).abs().max().item() <= HALF_TOLERANCE[dtype] * scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [c for c in CASES if c.values[0].family in ("boft", "oft")]
                         + [pytest.param(NEUMANN, id=config_id(NEUMANN))])
def test_orthogonal_blocks_stay_fp32_under_autocast(config, dtype):
    layer = adapted(config)[0]
    with torch.no_grad():
        layer.skew.add_(0.3 * torch.randn_like(layer.skew))
    full = layer.orthogonal_blocks()
    with torch.autocast("cpu", dtype=dtype):
        blocks = layer.orthogonal_blocks()
    assert blocks.dtype == torch.float32
    torch.testing.assert_close(blocks, full, rtol=0, atol=1e-6)  # the same fp32 computation, autocast or not
    if layer.config.neumann_terms is None:  # the exact Cayley transform is orthogonal to fp32 rounding
        eye = torch.eye(layer.block_size).expand_as(blocks)
        assert (blocks @ blocks.transpose(-1, -2) - eye).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("config", [c for c in CASES if c.values[0].family == "surm"])
def test_surm_ffts_run_in_fp32_under_autocast(config, dtype, monkeypatch):
    model = adapted(config)
    seen = []
    for name in ("rfft", "irfft"):
        original = getattr(torch.fft, name)

        def recording(x, *args, _original=original, **kwargs):
            seen.append(x.dtype)
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(torch.fft, name, recording)
    x, _ = data()
    with torch.autocast("cpu", dtype=dtype):
        model(x).float().sum().backward()
    assert seen and all(d in (torch.float32, torch.complex64) for d in seen), set(seen)


# --- gradient checkpointing ------------------------------------------------------------------------------------------
#: one projection of every Llama block per registered family (its canonical example): every family checkpointed
LLAMA_ADAPTERS = dict(zip(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                          canonical_configs().values(), strict=False))


def test_every_family_has_a_projection_in_the_checkpointed_llama():
    assert len(LLAMA_ADAPTERS) == len(canonical_configs()), "more families than a Llama block has projections"


def tiny_llama(checkpointing, reentrant=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    for projection, adapter in LLAMA_ADAPTERS.items():
        boftlab.adapt(model, adapter, targets=[projection])
    if checkpointing:
        # the embeddings are frozen, so with re-entrant checkpointing the checkpointed blocks' inputs would not need
        # grad and the adapters inside would get none: enable_input_require_grads makes the embedding output need it
        model.enable_input_require_grads()
        enable = getattr(model, "activation_checkpointing_enable", None)
        kwargs = {"use_reentrant": reentrant}
        enable(kwargs) if enable else model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model.train()


def adapter_grads(model):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference_grads():
    return adapter_grads(tiny_llama(checkpointing=False))


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_adapter_gradients(reentrant, reference_grads):
    model = tiny_llama(checkpointing=True, reentrant=reentrant)
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    grads = adapter_grads(model)
    assert grads.keys() == reference_grads.keys() and len(grads) > 8 and all(g is not None for g in grads.values())
    for projection in LLAMA_ADAPTERS:  # every family's layers receive gradient
        assert sum(g.abs().sum() for n, g in grads.items() if projection in n) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=0, atol=1e-6)


# --- merges compute in fp64 whatever the adapter's and the base's dtypes ------------------------------------------------
#: options no example uses, whose merges compute differently: BOFT's Neumann series, SURM's Kronecker structure
MERGE_EXTRAS = [BOFTConfig(block_size=4, n_factors=2, neumann_terms=3), SURMConfig(structure="kronecker"),
                SURMConfig(structure="kronecker", mode="adapter", activation="identity")]
MERGE_CASES = [pytest.param(config, kind, id=f"{config_id(config)}-{kind.__name__}")
               for config in [*(c.values[0] for c in CASES), *MERGE_EXTRAS]
               for kind in (nn.Linear, nn.Conv2d, nn.Embedding) if kind in config.supported_layers()]
MERGE_DTYPES = [torch.float32, torch.bfloat16, torch.float64]


def trained_layer(config: boftlab.AdapterConfig, kind: type[nn.Module], adapter_dtype: torch.dtype,
                  base_dtype: torch.dtype) -> boftlab.AdapterLayer:
    torch.manual_seed(0)
    layer = config.make_layer(LAYERS[kind][0]().to(base_dtype))
    with torch.no_grad():
        for name, p in layer.adapter_parameters().items():
            p.data = (p.detach().double() + 0.3 * torch.randn_like(p, dtype=torch.float64)).to(adapter_dtype)
    return layer


def fp64_twin(layer: boftlab.AdapterLayer) -> boftlab.AdapterLayer:
    """The same layer with every tensor (base and adapter) in fp64: exact copies of the values."""
    import copy
    return copy.deepcopy(layer).to(torch.float64)


def one_rounding(result: torch.Tensor, exact: torch.Tensor) -> None:
    """``result`` is ``exact`` (fp64) rounded once to result's dtype: within half an ulp of it, plus a tie's slack."""
    eps = torch.finfo(result.dtype).eps
    bound = eps * exact.abs() + torch.finfo(result.dtype).tiny
    assert ((result.double() - exact).abs() <= bound).all(), (result.double() - exact).abs().max().item()


@pytest.mark.parametrize("base_dtype", MERGE_DTYPES, ids=str)
@pytest.mark.parametrize("adapter_dtype", MERGE_DTYPES, ids=str)
@pytest.mark.parametrize("config,kind", MERGE_CASES)
def test_merge_and_unmerge_compute_in_fp64_for_any_adapter_and_base_dtype(config, kind, adapter_dtype, base_dtype):
    """merged_weights (merge, unwrap, save_merged) and unmerged_weights give the fp64 result of the
    adapter's own values, rounded once to the base dtype — never computed in a bf16 adapter's or an fp32 Cayley
    transform's precision."""
    layer = trained_layer(config, kind, adapter_dtype, base_dtype)
    twin = fp64_twin(layer)
    merged, exact = layer.merged_weights(), twin.merged_weights()
    for name, tensor in merged.items():
        assert tensor.dtype == base_dtype
        one_rounding(tensor, exact[name])
    layer.merge()
    with torch.no_grad():
        for name in merged:
            getattr(twin.base_layer, name).copy_(getattr(layer.base_layer, name))  # the same W', exactly
    restored, exact = layer.unmerged_weights(), twin.unmerged_weights()
    for name, tensor in restored.items():
        one_rounding(tensor, exact[name])


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_a_reference_pass_inside_disabled_under_gradient_checkpointing_gives_the_uncheckpointed_gradients(reentrant):
    """The DPO pattern on a transformers model with gradient_checkpointing_enable(): the reference loss inside
    boftlab.disabled, the policy loss outside, one backward after the block. Its recomputation of the reference pass
    bypasses the adapters as the pass did, so every gradient is the one without checkpointing (before: the adapters
    got the reference pass's gradient too, or non-reentrant checkpointing raised a CheckpointError)."""
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    grads = {}
    for checkpointing in (False, True):
        model = tiny_llama(checkpointing, reentrant)
        with boftlab.disabled(model):
            reference = model(input_ids=ids, labels=ids).loss
        (model(input_ids=ids, labels=ids).loss - reference).backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads[True].values()) and grads[True].keys() == grads[False].keys()
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=0, atol=1e-6)
