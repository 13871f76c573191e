"""The reproduction runner on tiny settings: it runs, measures, and writes results.md and PNGs from the run."""

import copy
import dataclasses
import json
import math
import re
import sys
import tempfile
import weakref

import pytest
import torch

from boftlab.__main__ import main as cli
from boftlab.reproduce import DOMAINS, diffusion, llm, memory, pretrained, reproduce, vit
from boftlab.reproduce.data import batch_indices, digits, stratified_split
from boftlab.reproduce.methods import Method, adapter_methods, method_families, prepare, quantized_layers
from boftlab.reproduce.protocol import (CLAIMS, FULL, DomainResults, MethodResult, Paired, Protocol, _grid,
                                        check_claims, choose_lr, paired_against_lora, reduced_protocol, verdict)
from boftlab.reproduce.results import (REPOSITORY, Results, load_results, plot_curves, provenance, ranking,
                                       results_table, seed_table, write_results)
from boftlab.reproduce.runner import autocast_dtype, lr_factor, run_method, run_methods
from boftlab.reproduce.task import Run, Task

TINY_VIT = vit.Settings(steps=4, batch_size=16, eval_every=2)
BOFT = Method("BOFT b=8 m=2", "boft", {"block_size": 8, "n_factors": 2}, vit.CI_LINEARS, lr=3e-3)
LORA = Method("LoRA r=4 (PEFT)", "lora", {"r": 4, "lora_alpha": 8}, vit.CI_LINEARS, lr=3e-3)
BOFT_COLAB = next(m for m in vit.colab_methods() if m.family == "boft")


# --- inputs are checked ------------------------------------------------------------------------------------------------
def test_method_rejects_unknown_family():
    with pytest.raises(ValueError, match=r"unknown family 'bofft'.*'boft'"):
        Method("x", "bofft", targets="fc")


def test_method_needs_targets_for_adapters():
    with pytest.raises(ValueError, match="needs targets"):
        Method("x", "lora")


@pytest.mark.parametrize("module", [vit, llm, diffusion])
def test_settings_reject_unknown_profile(module):
    with pytest.raises(ValueError, match=r"profile='gpu'; valid profiles: \['ci', 'colab'\]"):
        module.settings("gpu")


def test_reproduce_rejects_unknown_domain(tmp_path):
    with pytest.raises(ValueError, match=r"unknown domain\(s\) \['vision'\]; valid domains"):
        reproduce(["vision"], "ci", tmp_path)


@pytest.mark.parametrize("argv, choices", [
    (["reproduce", "vision"], "'vit', 'llm', 'diffusion', 'all'"),
    (["reproduce", "vit", "--profile", "gpu"], "'ci', 'colab'"),
])
def test_cli_errors_name_valid_choices(argv, choices, capsys):
    with pytest.raises(SystemExit):
        cli(argv)
    assert choices in capsys.readouterr().err


def test_missing_checkpoint_says_where_they_come_from(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="data/scripts"):
        vit.load_ci_vit()


# --- the pieces of the loop -------------------------------------------------------------------------------------------
def test_lr_factor_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 10) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)


def test_batch_indices_repeat_exactly_and_cover_an_epoch():
    first = [batch_indices(50, 10, s, seed=3) for s in range(5)]
    again = [batch_indices(50, 10, s, seed=3) for s in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sorted(torch.cat(first).tolist()) == list(range(50))


def test_stratified_split_is_disjoint_and_keeps_class_shares():
    labels = torch.tensor([0] * 10 + [1] * 20)
    train, test = stratified_split(labels, 0.5, seed=0)
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == 30
    assert (labels[test] == 0).sum() == 5 and (labels[test] == 1).sum() == 10


def test_digits_are_the_bundled_classes_in_unit_range():
    images, labels = digits([5, 6])
    assert images.shape[1:] == (1, 8, 8) and set(labels.tolist()) == {5, 6}
    assert images.min() >= 0 and images.max() <= 1


def test_windows_split_a_stream_into_context_plus_one():
    w = llm.windows(torch.arange(23), 4)
    assert w.shape == (4, 5) and w[1].tolist() == [5, 6, 7, 8, 9]


# --- runs on the shipped checkpoints ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_task():
    return vit.make_task("ci", TINY_VIT)[0]


def test_parameter_counts_match_the_structure(vit_task):
    run = run_method(vit_task, BOFT, progress=False)
    # 16 Linear layers; fan-in 64 (qkv, proj, fc1) or 128 (fc2): m · (d/b) · b(b−1)/2 skew entries, plus the scales
    skew = 4 * (3 * 2 * 64 * 7 // 2 + 2 * 128 * 7 // 2)
    scales = 4 * (192 + 64 + 128 + 64)
    assert run.method_params == skew + scales
    assert run.trainable == run.method_params + 64 * 5 + 5  # + the new head


def test_adapters_start_at_the_pretrained_model(vit_task):
    """Every method's step-0 accuracy is the same: adapters are the identity at init, the head has one seed."""
    runs = [run_method(vit_task, m, progress=False) for m in (Method("head only", "head"), LORA, BOFT)]
    assert len({r.before for r in runs}) == 1


def test_run_measures_steps_losses_and_metric(vit_task):
    run = run_method(vit_task, LORA, progress=False)
    assert run.steps == [1, 2, 3, 4] and len(run.losses) == 4 and all(math.isfinite(v) for v in run.losses)
    assert run.eval_steps == [0, 2, 4] and all(0.0 <= v <= 1.0 for v in run.evals)
    assert run.ms_per_step > 0 and run.peak_mib > 0  # CPU too: weights, AdamW states and the step's own tensors
    assert run.losses != run_method(vit_task, BOFT, progress=False).losses


def test_method_without_its_package_is_skipped_with_its_reason(vit_task, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # PEFT not installed: importing it raises ImportError
    run = run_method(vit_task, LORA, progress=False)
    assert run.skipped and "PEFT is not importable here" in run.skipped and "pip install peft" in run.skipped
    assert f"| {LORA.name} | skipped: " in results_table([run], "accuracy")


# --- fitting one GPU: out-of-memory rows, the memory gate, one model at a time, autocast, checkpointing --------------
def test_out_of_memory_in_one_method_is_its_row_the_model_is_freed_and_the_next_method_runs(vit_task):
    """A simulated CUDA out-of-memory error at BOFT's second step: BOFT's row says so, with the setting; its model
    and optimizer are gone when run_methods moves on; LoRA then runs all its steps."""
    seen = []  # (method's first trainable parameter, model) of every step, held weakly

    def loss(model, step):
        seen.append((weakref.ref(next(p for p in model.parameters() if p.requires_grad)), weakref.ref(model)))
        if len(seen) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return vit_task.loss(model, step)

    task = dataclasses.replace(vit_task, loss=loss, precision=torch.bfloat16, setting="batch 16 images")
    boft_run, lora_run = run_methods(task, [BOFT, LORA], progress=False)
    assert boft_run.skipped == ("out of memory after 1 of 4 steps (batch 16 images, bfloat16 autocast): CUDA out of "
                                "memory. Tried to allocate 2.00 GiB (simulated)")
    assert seen[0][0]() is None and seen[0][1]() is None  # BOFT's model and parameters were freed
    assert not lora_run.skipped and lora_run.steps == [1, 2, 3, 4]
    table = results_table([boft_run, lora_run], "accuracy")
    assert f"| {BOFT.name} | out of memory after 1 of 4 steps (batch 16 images" in table
    assert ranking([boft_run, lora_run], "accuracy").endswith(f"Skipped: {BOFT.name}.")


def test_memory_gate_skips_a_method_its_estimate_does_not_fit(vit_task, monkeypatch):
    full = Method("full fine-tuning", "full", lr=1e-3)
    need = memory.training_bytes(prepare(copy.deepcopy(vit_task.base), full, vit_task.trainable))
    monkeypatch.setattr(memory, "free_memory", lambda device: need - 1)  # one byte short
    run = run_method(dataclasses.replace(vit_task, setting="batch 16 images"), full, progress=False)
    assert run.skipped.startswith(f"skipped: needs ≈ {need / 2**30:.1f} GiB (weights; gradients and AdamW states of "
                                  "135,813 trainable parameters; ≈ 0.0 GiB activations for batch 16 images, fp32)")
    assert not run.losses
    monkeypatch.setattr(memory, "free_memory", lambda device: need)  # exactly enough
    assert not run_method(vit_task, full, progress=False).skipped


def test_training_bytes_counts_weights_and_adamw_states_of_the_trainable():
    model = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 2))  # 110 + 22 parameters
    model[0].requires_grad_(False)
    assert memory.training_bytes(model) == 4 * 110 + 4 * 4 * 22  # frozen: weights; trainable: + grad + 2 moments
    assert memory.training_bytes(model.half(), activation_bytes=7) == 2 * 110 + 2 * 4 * 22 + 7


def test_autocast_is_bf16_only_where_the_gpu_has_it(monkeypatch):
    assert autocast_dtype(torch.device("cpu")) is None
    for capability, dtype in [((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, c=capability: c)
        assert autocast_dtype(torch.device("cuda")) == dtype  # a T4 is sm_75: fp16


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16])
def test_training_under_autocast_runs_and_learns(vit_task, precision):
    """fp16 (with loss scaling) and bf16 autocast, on the CPU: every step is finite, the metric is a metric."""
    run = run_method(dataclasses.replace(vit_task, precision=precision), BOFT, progress=False)
    assert not run.skipped and len(run.losses) == 4 and all(math.isfinite(v) for v in run.losses)
    assert 0.0 <= run.final <= 1.0


def test_gradient_checkpointing_changes_memory_not_numbers(colab_vit_task):
    """transformers' non-reentrant checkpointing passes gradients to the adapters of a frozen model: the same losses."""
    plain = run_method(colab_vit_task, BOFT_COLAB, progress=False)
    checkpointed = run_method(dataclasses.replace(colab_vit_task, gradient_checkpointing=True), BOFT_COLAB,
                              progress=False)
    assert checkpointed.losses == pytest.approx(plain.losses, rel=1e-5) and checkpointed.evals == plain.evals


def test_gradient_checkpointing_refuses_a_model_without_a_switch():
    with pytest.raises(ValueError, match="Sequential has no gradient-checkpointing switch.*checkpointing=False"):
        memory.enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_colab_profiles_fit_a_gpu_and_ci_profiles_do_not_change():
    for module in (vit, llm, diffusion):
        colab, ci = module.settings("colab"), module.settings("ci")
        assert colab.mixed_precision and colab.gradient_checkpointing
        assert not ci.mixed_precision and not ci.gradient_checkpointing


def test_four_bit_option_is_the_papers_llm_in_4_bits_for_the_colab_profile_only():
    s = llm.four_bit(llm.settings("colab"))
    assert (s.model, s.load_in_4bit) == ("meta-llama/Llama-2-7b-hf", True)
    assert s.mixed_precision and s.gradient_checkpointing and s.steps < llm.settings("colab").steps
    with pytest.raises(ValueError, match=r"ci profile's settings.*llm\.settings\('colab'\)"):
        llm.four_bit(llm.settings("ci"))


@pytest.fixture(scope="module")
def tiny_4bit_lm(tmp_path_factory):
    """A 2-layer Llama saved like a hub model and loaded as the 4-bit option loads one (bitsandbytes nf4, on CPU)."""
    pytest.importorskip("bitsandbytes")
    folder = tmp_path_factory.mktemp("tiny_llama")
    torch.manual_seed(0)
    llm.build_ci_lm(num_hidden_layers=2).save_pretrained(folder)
    return llm.load_causal_lm(str(folder), load_in_4bit=True, device=torch.device("cpu"))


def test_4bit_llm_adapters_train_on_frozen_weights_and_full_fine_tuning_is_a_row(tiny_4bit_lm):
    """Every adapter trains on the 4-bit model (fp16 autocast with loss scaling and checkpointing, as on a T4) and
    leaves its packed weights as they were; full fine-tuning, which would train them, is a skipped row that says so."""
    assert len(quantized_layers(tiny_4bit_lm)) == 2 * 7
    packed = {name: p.detach().clone() for name, p in tiny_4bit_lm.named_parameters() if p.dtype == torch.uint8}
    tokens = torch.randint(0, llm.ARCH["vocab_size"], (4, 17), generator=torch.Generator().manual_seed(0))
    task = Task(tiny_4bit_lm, [], lambda m, step: llm.mean_nll(m, tokens[step % 3:step % 3 + 2]),
                lambda m: llm.perplexity(m, tokens, torch.device("cpu")), 3, 3, torch.device("cpu"),
                precision=torch.float16, gradient_checkpointing=True)
    methods = [Method("full fine-tuning", "full"), *adapter_methods(llm.COLAB_LINEARS, 1e-3, 4, 16, 4)]
    full, *adapters, c3a = run_methods(task, methods, progress=False)
    assert c3a.method.family == "c3a" and "PEFT's C3A adapts plain nn.Linear layers only" in c3a.skipped
    assert "['Linear4bit']" in c3a.skipped
    assert full.skipped == ("skipped: full fine-tuning trains every weight, and 14 layers of this model store theirs "
                            "quantized (bitsandbytes), which no optimizer can update; load the model in 16 bits to "
                            "train it fully")
    for run in adapters:
        assert not run.skipped and len(run.losses) == 3 and all(math.isfinite(v) for v in run.losses), run.method
        assert run.evals[-1] != run.evals[0]
    assert all(torch.equal(p, packed[name]) for name, p in tiny_4bit_lm.named_parameters() if name in packed)


def test_memory_gate_does_not_count_twice_what_is_already_on_the_gpu(vit_task, monkeypatch):
    """A 4-bit model is quantized on the GPU as it loads: its copy is there before the gate asks what it needs."""
    model = prepare(copy.deepcopy(vit_task.base), BOFT, vit_task.trainable)
    need = memory.training_bytes(model)
    monkeypatch.setattr(memory, "free_memory", lambda device: need - 1)
    assert memory.memory_gate(vit_task, model).startswith("skipped: needs ≈")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: not t.requires_grad))  # the frozen weights
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    monkeypatch.setattr(memory, "free_memory", lambda device: need - frozen)
    assert memory.memory_gate(vit_task, model) is None
    monkeypatch.setattr(memory, "free_memory", lambda device: need - frozen - 1)
    assert memory.memory_gate(vit_task, model) is not None


def test_curves_and_sample_grids_are_figures_outside_pyplot():
    """Nothing is left open in pyplot (no leak, no second copy shown by an inline backend): a notebook shows them by
    displaying them."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    run = Run(BOFT, steps=[1, 2, 3], losses=[3.0, 2.0, 1.0], eval_steps=[0, 3], evals=[0.2, 0.8])
    open_before = plt.get_fignums()
    figures = [plot_curves([run], "accuracy", "ViT"), diffusion.plot_samples({"before": torch.rand(4, 1, 8, 8)})]
    assert all(isinstance(f, Figure) for f in figures) and plt.get_fignums() == open_before


def test_every_boftlab_family_is_a_method_family():
    """The runner names families as the contract does: one registry (contract.FAMILIES)."""
    from boftlab.contract import FAMILIES

    assert method_families() == ("head", "full", "lora", "c3a", *FAMILIES)
    assert {"boft", "oft", "surm", "tensor_core"} <= set(FAMILIES)


def test_results_md_and_pngs_carry_the_run_numbers(tmp_path, monkeypatch):
    monkeypatch.setitem(vit.SETTINGS, "ci", TINY_VIT)
    monkeypatch.setitem(vit.DOMAIN.methods, "ci", lambda: [Method("head only", "head"), LORA])
    path = reproduce(["vit"], "ci", tmp_path, progress=False, protocol=Protocol("test", seeds=(0, 1)))
    text = path.read_text()
    results = load_results(tmp_path / "results.json")
    for m in results.domains["vit"].methods:
        row = next(line for line in text.splitlines() if line.startswith(f"| {m.name} |"))
        assert f"| {m.test[0]:.3g} | {m.test[1]:.3g} |" in row and f"{m.method_params:,}" in row
        assert f"| {m.peak_mib:.3g} |" in row  # CPU memory is measured
    assert re.search(r"\| machine \| CPU .*torch .*\d{4}-\d\d-\d\d", text)
    png = tmp_path / "vit_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "![vit_curves](./vit_curves.png)" in text


def test_llm_run_reports_held_out_perplexity():
    s = llm.Settings(steps=2, batch_size=4, context=32, eval_every=2)
    task, _ = llm.make_task("ci", s)
    lora = Method("LoRA", "lora", {"r": 2, "lora_alpha": 4}, llm.CI_LINEARS, lr=3e-3)
    run = run_method(task, lora, progress=False)
    base = task.base.eval()
    with torch.no_grad():
        assert run.before == pytest.approx(task.evaluate(base), rel=1e-5)  # LoRA starts at the pretrained model
    assert 1.0 < run.final < llm.ARCH["vocab_size"]


def test_diffusion_run_samples_before_and_after(monkeypatch):
    s = diffusion.Settings(steps=2, batch_size=8, eval_every=2, n_samples=6)
    monkeypatch.setitem(diffusion.SETTINGS, "ci", s)
    monkeypatch.setitem(diffusion.DOMAIN.methods, "ci", lambda: [
        Method("BOFT", "boft", {"block_size": 8, "n_factors": 2}, diffusion.CI_LAYERS, lr=3e-3)])
    report = diffusion.run("ci", progress=False)
    (run,) = report.runs
    assert run.extra["samples_before"].shape == (6, 1, 8, 8) and 0.0 <= run.test <= 1.0
    assert sum(run.extra["labels"]) == 6 and run.test == pytest.approx(run.extra["target_rate"] * run.extra["coverage"])
    assert 0.0 < run.final < run.before  # the validation denoising loss fell
    assert diffusion.diversity_table(report.runs).splitlines()[2].startswith("| BOFT |")
    assert set(report.figures) == {"diffusion_curves", "diffusion_samples"}


@pytest.mark.parametrize("profile", ["ci", "colab"])
@pytest.mark.parametrize("module", [vit, llm, diffusion])
def test_every_domain_compares_the_issue_families(module, profile):
    methods = module.profile_methods(profile)
    families = [m.family for m in methods]
    assert {"full", "lora", "oft", "tensor_core"} <= set(families)
    assert families.count("boft") == 2 and len({str(m.options) for m in methods if m.family == "boft"}) == 2
    assert {m.options["structure"] for m in methods if m.family == "surm"} == {"circulant", "kronecker"}


# --- the colab code paths, with tiny random stand-ins for the hub's models and data sets ----------------------------------
@pytest.fixture(scope="module")
def colab_vit_task():
    """vit.colab_task with a 1-layer random ViTForImageClassification and 18 random CIFAR-sized images."""
    import datasets
    import numpy as np
    import transformers
    from PIL import Image

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, image_size=224, patch_size=32, num_labels=10)
    rng = np.random.default_rng(0)

    def split(n):
        images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(n)]})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(transformers.ViTForImageClassification, "from_pretrained",
                      lambda name, num_labels: transformers.ViTForImageClassification(config))
        patch.setattr(datasets, "load_dataset", lambda name: {"train": split(18), "test": split(6)})
        s = vit.Settings(steps=2, batch_size=4, eval_every=2, train_size=12, validation_size=6, test_size=6)
        return vit.make_task("colab", s)[0]


@pytest.mark.parametrize("method", [
    pytest.param(m, id=m.name) for m in vit.colab_methods()  # tensor_core: transformers reads projection.weight.dtype
])
def test_colab_vit_path_runs_on_a_tiny_stand_in(colab_vit_task, method):
    run = run_method(colab_vit_task, method, progress=False, test=True)
    assert not run.skipped and (run.method_params > 0 or method.family == "head")
    assert run.eval_steps == [0, 2] and 0.0 <= run.final <= 1.0 and 0.0 <= run.test <= 1.0


def test_colab_llm_path_runs_on_a_tiny_stand_in(monkeypatch):
    import datasets
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(pretrained.pretrained_dir(llm.CHECKPOINT) / "tokenizer.json"), eos_token="<|endoftext|>")
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda name: transformers.Qwen2ForCausalLM(config))
    rows = {"instruction": ["Name a colour.", "Add the numbers.", "Say hi."] * 3,
            "input": ["", "2 and 3", ""] * 3, "output": ["Blue.", "5", "Hi!"] * 3}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_dict(rows))
    s = llm.Settings(steps=2, batch_size=2, context=48, eval_every=2, train_examples=4, validation_examples=2,
                     test_examples=2)
    task, _ = llm.make_task("colab", s)
    ids, labels = llm.alpaca_example(rows_first := {k: v[1] for k, v in rows.items()}, tokenizer, 48)
    assert labels[-1] == tokenizer.eos_token_id and labels.count(-100) == len(ids) - len(
        tokenizer(rows_first["output"] + tokenizer.eos_token)["input_ids"])
    for method in llm.colab_methods():
        run = run_method(task, method, progress=False, test=True)
        assert not run.skipped and run.method_params > 0, method.name
        assert math.isfinite(run.final) and run.final > 1.0 and math.isfinite(run.test) and run.test > 1.0



TINY_SD = diffusion.Settings(steps=2, batch_size=1, eval_every=2, n_samples=2, inference_steps=2,
                             mixed_precision=True, gradient_checkpointing=True)


def photo(width, height, seed):
    """A random RGB photo: a red centre square as tall as the photo, blue on either side (the subject and its
    surroundings: a centre crop keeps only red)."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 2] = 255
    side = (width - height) // 2
    pixels[:, side:side + height] = (255, 0, 0)
    noise = np.random.default_rng(seed).integers(0, 20, pixels.shape, dtype=np.uint8)
    return Image.fromarray(np.where(pixels > 0, pixels - noise, noise))


@pytest.fixture(scope="module")
def colab_diffusion():
    """diffusion.colab_task with a tiny random Stable Diffusion pipeline (UNet2DConditionModel with cross-attention
    on 8×8 latents, AutoencoderKL 16×16 -> 8×8, CLIPTextModel, a CLIP tokenizer of the 26 letters), a tiny random
    CLIP and five random 40×30 photos. (task, what the pipeline's VAE encoded, the images CLIP embedded, the frozen
    models' tensors before any method ran.)"""
    import datasets
    import diffusers
    import transformers

    letters = list("abcdefghijklmnopqrstuvwxyz")
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)])}
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=24)
    text_config = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, max_position_embeddings=24, projection_dim=16)
    clip_config = transformers.CLIPConfig(text_config=text_config, projection_dim=16, vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8))
    encoded, embedded, models = [], [], {}

    def pipeline(name, **options):
        torch.manual_seed(0)
        vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)
        encode = vae.encode
        vae.encode = lambda pixels: encoded.append(pixels.clone()) or encode(pixels)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)
        scheduler = diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)  # SD v1.5's
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config))
        models.update(vae=vae, text_encoder=text_encoder, unet=unet)
        return diffusers.StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, feature_extractor=None,
                                                 **options)

    def clip(name):
        models["clip"] = transformers.CLIPModel(clip_config)
        return models["clip"]

    class Processor(transformers.CLIPProcessor):
        def __call__(self, images, **options):
            embedded.append(images)
            return super().__call__(images=images, **options)

    image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    photos = datasets.Dataset.from_dict({"image": [photo(40, 30, seed) for seed in range(5)]})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", pipeline)
        patch.setattr(transformers.CLIPModel, "from_pretrained", clip)
        patch.setattr(transformers.CLIPProcessor, "from_pretrained",
                      lambda name: Processor(image_processor=image_processor, tokenizer=tokenizer))
        patch.setattr(datasets, "load_dataset", lambda name, split: photos)
        task, _ = diffusion.make_task("colab", TINY_SD)
    frozen = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in models.items()}
    return task, encoded, embedded, models, frozen


def trains_only_its_own(task: Task) -> Task:
    """``task``, recording in ``run.extra`` which parameters the method trains and which changed in training."""
    start = {}

    def loss(m, step):
        if step == 0:  # before the first optimizer step
            start.update({name: p.detach().clone() for name, p in m.named_parameters()})
        return task.loss(m, step)

    def after(m, run):
        params = dict(m.named_parameters())
        run.extra["trainable"] = {name for name, p in params.items() if p.requires_grad}
        run.extra["changed"] = {name for name, p in params.items() if not torch.equal(p, start[name])}
        run.extra["frozen numbers"] = sum(p.numel() for p in params.values() if not p.requires_grad)

    return dataclasses.replace(task, loss=loss, after=after)


def test_colab_diffusion_trains_on_square_centre_crops_of_the_photos(colab_diffusion):
    """The photos are cut to the centre square at the resolution the pipeline samples at (the UNet's 8×8 latents ×
    the VAE's factor 2), not squashed: only the red centre of a 40×30 photo is left. (Four train, one validates.)"""
    _, encoded, *_ = colab_diffusion
    (pixels,) = encoded
    assert pixels.shape == (5, 3, 16, 16)
    red, blue = pixels[:, 0], pixels[:, 2]
    assert (red > 0.7).all() and (blue < -0.7).all(), "the blue sides of the photos were squashed in"


@pytest.mark.parametrize("method", [pytest.param(m, id=m.name) for m in diffusion.colab_methods()])
def test_colab_diffusion_path_runs_on_a_tiny_stand_in(colab_diffusion, method):
    """Each method of the colab profile, two steps with gradient checkpointing: it trains exactly its own parameters
    (every one of them changes; nothing else does — the adapted UNet's frozen weights, the pretrained UNet it was
    copied from, the VAE, the text encoder, CLIP), CLIP-I is a cosine similarity, and every evaluation generates
    n_samples RGB images at the pipeline's resolution — once, for the test; the curves' validation metric is the
    held-out photo's denoising loss."""
    task, _, embedded, models, frozen = colab_diffusion
    assert task.gradient_checkpointing and task.setting == "batch 1 images at 16×16"
    embedded.clear()
    run = run_method(trains_only_its_own(task), method, progress=False, test=True)
    assert not run.skipped and run.eval_steps == [0, 2] and all(math.isfinite(v) for v in run.losses)
    assert all(math.isfinite(v) and v > 0 for v in run.evals) and -1.0 <= run.test <= 1.0
    trained = run.extra["trainable"]
    assert run.extra["changed"] == trained, f"trained but unchanged: {sorted(trained - run.extra['changed'])[:3]}"
    unet_numbers = sum(p.numel() for p in models["unet"].parameters())
    if method.family == "full":
        assert run.method_params == unet_numbers and run.extra["frozen numbers"] == 0
    else:
        assert 0 < run.method_params < unet_numbers and run.extra["frozen numbers"] == unet_numbers
    for name, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, frozen[name][key]), f"{name}.{key} changed"
    assert len(embedded) == 1  # the test, at the end
    assert all(len(images) == TINY_SD.n_samples and {(i.mode, i.size) for i in images} == {("RGB", (16, 16))}
               for images in embedded)


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16], ids=["fp16 (a T4)", "bf16"])
@pytest.mark.parametrize("method", [pytest.param(m, id=m.name) for m in diffusion.colab_methods()
                                    if m.family in ("lora", "boft")][:2])
def test_colab_diffusion_path_trains_under_autocast(colab_diffusion, method, precision):
    """What a GPU runs: the same steps under fp16 autocast with loss scaling, or bf16; finite losses and CLIP-I."""
    task, *_ = colab_diffusion
    run = run_method(trains_only_its_own(dataclasses.replace(task, precision=precision)), method, progress=False)
    assert not run.skipped and all(math.isfinite(v) for v in run.losses)
    assert all(math.isfinite(v) for v in run.evals) and run.extra["changed"] == run.extra["trainable"]


def diverging(task: Task, at_step: int) -> Task:
    """``task`` whose training diverges: at ``at_step`` one trainable tensor becomes NaN, as after a step at too high
    a learning rate."""

    def loss(m, step):
        if step == at_step:
            with torch.no_grad():
                next(p for p in m.parameters() if p.requires_grad).fill_(float("nan"))
        return task.loss(m, step)

    return dataclasses.replace(task, loss=loss)


@pytest.mark.parametrize("domain", ["vit ci", "diffusion colab"])
def test_a_run_whose_parameters_diverged_is_a_row_that_says_so_not_a_metric(domain, vit_task, colab_diffusion):
    """A NaN model still got a metric — argmax of NaN logits is class 0 (ViT accuracy 0.20 of 5 classes), a NaN image
    becomes a black one that CLIP scores like any other (CLIP-I 0.82 on the stand-in) — so a diverged method ranked
    among the others. Its row now says that it diverged, when, and what to lower."""
    task = vit_task if domain == "vit ci" else colab_diffusion[0]
    method = BOFT if domain == "vit ci" else next(m for m in diffusion.colab_methods() if m.family == "boft")
    run = run_method(diverging(task, 1), method, progress=False)
    assert run.skipped is not None and run.skipped.startswith(f"diverged after 2 of {task.steps} steps: ")
    assert "NaN or inf" in run.skipped and f"lr={method.lr:g}" in run.skipped
    assert run.evals == run.evals[:1]  # the metric before training only
    assert f"| {method.name} | diverged after 2 of" in results_table([run], "metric")

# --- seeds and the diffusion metric ---------------------------------------------------------------------------------------
def finished(name, final, params=100):
    run = Run(Method(name, "head"), method_params=params)
    run.evals = [0.1, final]
    return run


def test_seed_table_reports_mean_and_std_and_names_the_rankings_within_noise():
    by_seed = {0: [finished("a", 0.80), finished("b", 0.70), finished("c", 0.69)],
               1: [finished("a", 0.82), finished("b", 0.74), finished("c", 0.71)],
               2: [finished("a", 0.84), finished("b", 0.72), finished("c", 0.73)]}
    table = seed_table(by_seed, "accuracy")
    lines = table.splitlines()
    assert lines[0] == "| method | params of the method | seed 0 | seed 1 | seed 2 | accuracy: mean ± std |"
    assert lines[2] == "| a | 100 | 0.8 | 0.82 | 0.84 | 0.82 ± 0.02 |"  # best mean first; std with n − 1
    assert lines[3].startswith("| b |") and lines[4].startswith("| c |")
    assert "not separated by 3 seeds): b / c." in table  # 0.72 vs 0.71, std 0.02: within noise; a / b is not


def test_seed_table_refuses_seeds_that_ran_different_methods():
    with pytest.raises(ValueError, match="same methods in the same order"):
        seed_table({0: [finished("a", 0.8)], 1: [finished("b", 0.8)]}, "accuracy")


def test_run_seeds_remakes_the_task_with_each_seed(monkeypatch):
    monkeypatch.setitem(vit.SETTINGS, "ci", TINY_VIT)
    by_seed = vit.run_seeds("ci", (0, 1), [Method("head only", "head")], progress=False)
    assert sorted(by_seed) == [0, 1] and by_seed[0][0].losses != by_seed[1][0].losses  # another split and batches
    assert by_seed[0][0].losses == vit.run("ci", False, [Method("head only", "head")]).runs[0].losses


class LabelsAre(torch.nn.Module):
    """A stand-in classifier that labels the i-th image ``labels[i]``."""

    def __init__(self, labels):
        super().__init__()
        self.labels = torch.tensor(labels)

    def forward(self, images):
        return torch.nn.functional.one_hot(self.labels[:len(images)], 10).float()


@pytest.mark.parametrize("labels, rate, cover", [
    ([5] * 10, 1.0, 0.2),  # only 5s: every sample a target digit, one of five drawn
    ([5, 6, 7, 8, 9] * 2, 1.0, 1.0),
    ([0, 1, 5, 6, 0, 1, 5, 6, 2, 3], 0.4, 0.4),  # two target digits, equally often
    ([0] * 10, 0.0, 0.0),
])
def test_the_diffusion_metric_counts_diversity(labels, rate, cover):
    images = torch.zeros(len(labels), 1, 8, 8)
    classifier = LabelsAre(labels)
    assert diffusion.target_rate(classifier, images, diffusion.TARGET_CLASSES) == pytest.approx(rate)
    assert diffusion.coverage(classifier, images, diffusion.TARGET_CLASSES) == pytest.approx(cover)
    assert diffusion.covered_target_rate(classifier, images, diffusion.TARGET_CLASSES) == pytest.approx(rate * cover)


def test_sample_grid_borders_are_white():
    fig = diffusion.plot_samples({"x": torch.ones(2, 1, 8, 8)}, per_row=2)  # black digits
    strip = fig.axes[0].images[0].get_array()
    assert strip[0, 0] == 0.0 and strip[1, 1] == 1.0  # gray_r: 0 is white (border), 1 black (ink)


def test_seed_table_needs_two_seeds():
    with pytest.raises(ValueError, match="at least two seeds, got \\[0\\]"):
        seed_table({0: [finished("a", 0.8)]}, "accuracy")


def _bad_outs(tmp_path):
    (tmp_path / "file").write_text("keep me")
    (tmp_path / "taken" / "results.md").mkdir(parents=True)
    return [
        (tmp_path / "file", r"--out '.*file' is an existing file; the results are a directory"),
        (tmp_path / "file" / "sub", r"cannot be created: '.*file' is a file, not a directory"),
        (tmp_path / "taken", r"results.md' is a directory"),
    ]


def test_cli_checks_out_before_any_training(tmp_path, monkeypatch, capsys):
    """--out an existing file used to train for minutes, then die with a raw FileExistsError, the results lost."""
    monkeypatch.setattr(vit, "run_protocol", lambda *a, **k: pytest.fail("trained before checking --out"))
    for out, message in _bad_outs(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            cli(["reproduce", "vit", "--out", str(out), "--quiet"])
        assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)
        with pytest.raises(ValueError, match=message):
            reproduce(["vit"], "ci", out)
    assert (tmp_path / "file").read_text() == "keep me"


def test_unwritable_out_is_refused_before_training(tmp_path, monkeypatch):
    """A read-only directory (simulated: this suite may run as root, who writes anywhere)."""
    monkeypatch.setattr(vit, "run_protocol", lambda *a, **k: pytest.fail("trained before checking --out"))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"--out '.*new' is not writable: creating a file in '.*' fails \(Permission"):
        reproduce(["vit"], "ci", tmp_path / "new")
    assert not (tmp_path / "new").exists()


# --- the protocol: rates chosen on validation, paired intervals, claims, results files ------------------------------------
def test_paired_interval_is_the_paired_t_interval_computed_by_hand():
    """diffs 1, 2, 3: mean 2, sd 1, t(0.975, 2 dof) = 4.302653 → 2 ± 4.302653 / √3."""
    p = Paired.of("a", "b", [11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    half = 4.302652729911275 / math.sqrt(3)
    assert p.diffs == [1.0, 2.0, 3.0] and p.mean == pytest.approx(2.0)
    assert p.lo == pytest.approx(2 - half) and p.hi == pytest.approx(2 + half)
    assert p.interval() == "+2 [-0.484, +4.48]" and p.ranking(higher_is_better=True) == "not separated"
    tight = Paired.of("a", "b", [1.1, 1.2, 1.3], [1.0, 1.1, 1.2])  # every diff 0.1: sd 0, interval [0.1, 0.1]
    assert tight.ranking(True) == "better" and tight.ranking(False) == "worse"
    single = Paired.of("a", "b", [1.0], [0.5])
    assert single.lo is None and single.ranking(True) == "no interval (one seed)"
    with pytest.raises(ValueError, match="one value per seed"):
        Paired.of("a", "b", [1.0, 2.0], [1.0])


@pytest.mark.parametrize("kind, lo, hi, expected", [
    ("better", 0.01, 0.05, "supported"),
    ("better", -0.05, -0.01, "contradicted"),
    ("better", -0.01, 0.05, "inconclusive at this scale"),
    ("at least", -0.01, 0.05, "supported"),  # above −δ = −0.02
    ("at least", -0.09, -0.03, "contradicted"),
    ("at least", -0.05, 0.01, "inconclusive at this scale"),
    ("matches", -0.01, 0.015, "supported"),  # within ±0.02
    ("matches", 0.03, 0.08, "contradicted"),
    ("matches", -0.01, 0.05, "inconclusive at this scale"),
    ("matches", None, None, "no interval (one seed)"),
])
def test_verdicts_are_worded_from_the_interval(kind, lo, hi, expected):
    assert verdict(kind, lo, hi, margin=0.02) == expected


def test_verdict_refuses_an_unknown_kind():
    with pytest.raises(ValueError, match=r"claim kind 'beats'; valid kinds: \['at least', 'better', 'matches'\]"):
        verdict("beats", 0.0, 1.0, 0.02)


def method_result(name, family, test, options=None, seeds=(0, 1, 2)):
    return MethodResult(name, family, options or {}, seeds=list(seeds), test=list(test), lr=1e-3)


def test_claims_are_oriented_by_the_metric_and_say_what_was_not_measured():
    """Perplexity: lower is better, so BOFT 10 below OFT on every seed supports "BOFT at least as good as OFT"."""
    methods = [method_result("OFT", "oft", [100.0, 102.0, 101.0]),
               method_result("BOFT", "boft", [90.0, 91.0, 90.5], {"block_size": 8, "n_factors": 2}),
               method_result("LoRA", "lora", [95.0, 96.0, 95.5])]
    rows = {r.claim: r for r in check_claims(CLAIMS, methods, higher_is_better=False, margin=2.0)}
    boft = rows["BOFT (b=8, m=2) is at least as good as OFT at about equal parameters"]
    assert boft.verdict == "supported" and boft.evidence.mean == pytest.approx(-10.5) and (boft.a, boft.b) == (
        "BOFT", "OFT")
    assert rows["SURM circulant matches LoRA with far fewer parameters"].verdict.startswith(
        "not measured: no finished surm {'structure': 'circulant'}")
    flipped = check_claims(CLAIMS[:1], methods, higher_is_better=True, margin=2.0)[0]
    assert flipped.verdict == "contradicted"  # the same numbers as accuracies: BOFT is worse


class FakeRuns:
    """Stands in for run_method / evaluate_kept: a run's last validation metric is ``validation(lr)``, its test
    metric ``test(lr)``; records which rates were trained and which runs were tested."""

    def __init__(self, validation, test):
        self.validation, self.test = validation, test
        self.trained, self.tested = [], []

    def run_method(self, task, method, progress=True, test=False, keep_trained=False):
        self.trained.append(method.lr)
        run = Run(method, trainable=10, method_params=7)
        run.evals, run.eval_steps, run.ms_per_step, run.peak_mib = [0.0, self.validation(method.lr)], [0, 4], 1.0, 2.0
        run.trained = {"w": torch.zeros(1)} if keep_trained else None
        if test:
            run.test = self.test(method.lr)
            self.tested.append(method.lr)
        return run

    def evaluate_kept(self, task, run):
        run.test = self.test(run.method.lr)
        self.tested.append(run.method.lr)


def choose(monkeypatch, validation, test, higher_is_better=True):
    fake = FakeRuns(validation, test)
    monkeypatch.setattr("boftlab.reproduce.protocol.run_method", fake.run_method)
    monkeypatch.setattr("boftlab.reproduce.protocol.evaluate_kept", fake.evaluate_kept)
    protocol = Protocol("test", seeds=(0,), lr_extensions=1)
    result, run = choose_lr(None, dataclasses.replace(LORA, lr=3e-3), protocol, higher_is_better, False)
    return result, run, fake


def test_the_rate_is_chosen_by_validation_and_only_the_chosen_run_is_tested(monkeypatch):
    """Validation peaks at 3e-3; the test metric would favour 1e-3. The choice follows validation, and the test is
    computed once, for the chosen run."""
    result, run, fake = choose(monkeypatch, {1e-3: 0.5, 3e-3: 0.9, 9e-3: 0.7}.get,
                               {1e-3: 0.99, 3e-3: 0.1, 9e-3: 0.5}.get)
    assert result.grid == [1e-3, 3e-3, 9e-3] and result.grid_validation == [0.5, 0.9, 0.7]
    assert result.lr == 3e-3 and result.at_edge is None and fake.trained == [1e-3, 3e-3, 9e-3]
    assert fake.tested == [3e-3] and run.test == 0.1


def test_lower_validation_is_better_where_the_metric_is_a_loss(monkeypatch):
    result, _, _ = choose(monkeypatch, {1e-3: 0.5, 3e-3: 0.2, 9e-3: 0.7}.get, lambda lr: 0.0, higher_is_better=False)
    assert result.lr == 3e-3


def test_a_rate_at_the_edge_extends_the_grid_once_and_is_flagged_if_still_there(monkeypatch):
    """Validation rises with the rate (as for C3A, whose PEFT docs advise lr ≈ 0.1): one ×3 step past the top edge
    is tried; still best, the choice is flagged in the result and in the table."""
    result, _, fake = choose(monkeypatch, lambda lr: lr, lambda lr: 0.0)
    assert fake.trained == [1e-3, 3e-3, 9e-3, 0.027] and result.grid == [1e-3, 3e-3, 9e-3, 0.027]
    assert result.lr == 0.027 and result.at_edge == "highest"
    found, _, fake = choose(monkeypatch, lambda lr: -abs(math.log(lr / 0.009)), lambda lr: 0.0)
    assert found.lr == 0.009 and found.at_edge is None and fake.trained[-1] == 0.027  # the step past it confirms it
    domain = results_of([result])
    row = next(line for line in domain.markdown().splitlines() if line.startswith(f"| {LORA.name} |"))
    assert "| 0.027 ⚑ highest of grid |" in row


def test_a_diverged_rate_is_never_chosen_and_the_grid_says_why(monkeypatch):
    fake = FakeRuns(lambda lr: lr, lambda lr: 0.0)

    def run_method(task, method, progress=True, test=False, keep_trained=False):
        run = fake.run_method(task, method, progress, test, keep_trained)
        if method.lr > 5e-3:
            run.skipped, run.evals = "diverged after 2 of 4 steps: …", run.evals[:1]
        return run

    monkeypatch.setattr("boftlab.reproduce.protocol.run_method", run_method)
    monkeypatch.setattr("boftlab.reproduce.protocol.evaluate_kept", fake.evaluate_kept)
    result, _ = choose_lr(None, dataclasses.replace(LORA, lr=3e-3), FULL, True, False)
    assert result.lr == 3e-3 and result.at_edge is None and result.grid_validation[2] is None
    assert result.grid_notes[2].startswith("diverged")


def results_of(methods, domain="vit", protocol=FULL):
    return DomainResults(domain, "title", "ci", protocol, "description", "test accuracy", True,
                                "validation accuracy", True, 0.02, methods, paired_against_lora(methods),
                                check_claims(CLAIMS, methods, True, 0.02))


def test_results_json_round_trips_every_number(tmp_path):
    lora = method_result("LoRA r=4 (PEFT)", "lora", [0.8, 0.82, 0.81])
    surm = method_result("SURM circulant", "surm", [0.79, 0.8, 0.83], {"structure": "circulant", "mode": "lora"})
    surm.grid, surm.grid_validation, surm.grid_notes = [1e-3, 3e-3], [0.5, None], [None, "diverged"]
    surm.at_edge = "lowest"
    surm.validation, surm.losses, surm.extra = [[0.1, 0.5]] * 3, [[2.0, 1.0]] * 3, {"labels": [1, 2]}
    results = Results(provenance("a command", FULL), {"vit": results_of([lora, surm])})
    write_results(results, tmp_path)
    back = load_results(tmp_path / "results.json")
    assert back.to_dict() == results.to_dict() and back.markdown() == results.markdown()
    assert back.domains["vit"].method("SURM circulant").at_edge == "lowest"
    assert back.domains["vit"].protocol == FULL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md"]  # no temporary file left
    with pytest.raises(ValueError, match=r"no method 'BOFT' in the vit results; methods: \['LoRA r=4 \(PEFT\)'"):
        back.domains["vit"].method("BOFT")
    with pytest.raises(FileNotFoundError, match="python -m boftlab reproduce all --profile ci"):
        load_results(tmp_path / "missing.json")


def test_provenance_names_commit_command_seeds_grid_machine_and_lock():
    import hashlib

    about = provenance("python -m boftlab reproduce vit", FULL)
    assert about["command"] == "python -m boftlab reproduce vit" and about["seeds"] == [0, 1, 2]
    assert re.match(r"[0-9a-f]{40}", about["commit"]) or about["commit"].startswith("not a git checkout")
    lock = REPOSITORY / "constraints.txt"
    assert about["environment_lock"] == f"constraints.txt sha256 {hashlib.sha256(lock.read_bytes()).hexdigest()}"
    assert "× [0.3333, 1.0, 3.0], + up to 2 ×3" in about["lr_grid"] and "seed 0" in about["protocol"]
    assert about["machine"].startswith(("CPU", "NVIDIA")) and about["threads"] >= 1
    assert re.search(r"\d+\.\d\d, .*\(1, 5, 15 min", about["load_average_start"]) or \
        about["load_average_start"] == "not available"


def test_the_packaged_results_are_the_committed_ones():
    """load_results() reads package data (a wheel has it), a copy of the results.json the README quotes."""
    from boftlab.reproduce import results

    checkout = REPOSITORY / "docs" / "results" / "ci" / "results.json"
    assert results.COMMITTED_RESULTS.read_bytes() == checkout.read_bytes()
    committed = load_results()
    assert set(committed.domains) == {"vit", "llm", "diffusion"}
    assert all(len(m.seeds) >= 3 for d in committed.domains.values() for m in d.methods if not m.skipped)


def test_reduced_protocol_runs_the_committed_rates_on_one_seed():
    committed = results_of([method_result("LoRA r=4 (PEFT)", "lora", [0.8, 0.82, 0.81])])
    reduced = reduced_protocol(committed)
    assert reduced.name == "reduced" and reduced.seeds == (0,) and reduced.lrs == {"LoRA r=4 (PEFT)": 1e-3}
    assert "reduced protocol" in reduced.describe() and "committed full-protocol results" in reduced.describe()
    assert _grid(LORA, reduced) == [1e-3]
    with pytest.raises(ValueError, match=r"no learning rate for 'BOFT b=8 m=2'.*rerun the full protocol"):
        _grid(BOFT, reduced)


def test_a_protocol_needs_a_grid_of_three_rates_and_a_seed():
    with pytest.raises(ValueError, match=r"a grid needs ≥ 3 rates"):
        Protocol("x", seeds=(0,), lr_factors=(1.0, 3.0))
    with pytest.raises(ValueError, match="give at least one seed"):
        Protocol("x", seeds=())


def test_run_protocol_on_the_ci_vit_tests_each_chosen_run_once_per_seed(monkeypatch):
    """End to end on tiny settings: two seeds, a rate per method, a test metric per seed, LoRA paired with itself
    excluded, and the CPU memory of a step measured for every method."""
    d = vit.run_protocol("ci", Protocol("test", seeds=(0, 1), lr_extensions=0), progress=False,
                         methods=[Method("head only", "head", lr=3e-3), LORA], s=TINY_VIT)
    for m in d.methods:
        assert m.seeds == [0, 1] and len(m.test) == 2 and all(0 <= t <= 1 for t in m.test)
        assert m.lr in m.grid and len(m.grid) == 3 and m.peak_mib > 0 and len(m.validation) == 2
    assert [p.a for p in d.paired] == ["head only"] and d.paired[0].b == LORA.name
    assert d.validation_metric == "validation accuracy" and d.metric == "test accuracy"
    assert set(vit.figures(d)) == {"vit_curves"}


def test_jobs_must_be_at_least_one(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"jobs=0; give 1 \(one domain after another\) or more"):
        reproduce(["vit"], "ci", tmp_path, jobs=0)
    with pytest.raises(SystemExit):
        cli(["reproduce", "vit", "--jobs", "0", "--out", str(tmp_path)])
    assert "--jobs 0: give 1 or more" in capsys.readouterr().err


def test_adding_methods_refuses_before_any_training(tmp_path, monkeypatch):
    """``reproduce --add`` runs only new rows into full-protocol results: a row already there, a name no row has, or
    results of another protocol are refused before anything trains, and results.json is left as it was."""
    from boftlab import reproduce as rep
    from boftlab.reproduce import domain

    data = json.loads(rep.COMMITTED_RESULTS.read_text())
    data["provenance"]["protocol"] = rep.FULL.describe()  # as if made under today's full protocol
    (tmp_path / "results.json").write_text(json.dumps(data))
    runner_results = tmp_path / "results.json"
    before = runner_results.read_bytes()
    monkeypatch.setattr(domain.Domain, "run_protocol", lambda *a, **k: pytest.fail("trained"))
    present = rep.load_results(runner_results).domains["vit"].methods[0].name
    with pytest.raises(ValueError, match=r"already there"):
        rep.add_methods(["vit"], [present], "ci", tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"no ci row is called \['no such method'\]"):
        rep.add_methods(["vit"], ["no such method"], "ci", tmp_path, progress=False)
    assert runner_results.read_bytes() == before
    data["provenance"]["protocol"] = "reduced protocol: seed(s) 0"
    (tmp_path / "results.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"not the full protocol"):
        rep.add_methods(["vit"], ["C3A (PEFT)"], "ci", tmp_path, progress=False)


def test_the_loss_panel_is_logarithmic_only_where_the_losses_span_a_decade():
    """Within one decade a log axis labels one or two ticks (notebook 08's panel showed 4×10⁰ and 5×10⁰ only)."""
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from notebook_outputs import figure_problems

    steps = list(range(1, 51))
    narrow = Run(BOFT, steps=steps, losses=[5.1 - 0.03 * i for i in range(50)], eval_steps=[0, 50], evals=[201, 120])
    wide = Run(BOFT, steps=steps, losses=[30.0 * 0.9 ** i for i in range(50)], eval_steps=[0, 50], evals=[201, 120])
    for run, scale in ((narrow, "linear"), (wide, "log")):
        fig = plot_curves([run], "validation perplexity", "LLM")
        assert fig.axes[0].get_yscale() == scale and figure_problems(fig) == []


def test_the_reduced_protocol_expects_a_committed_skip_and_refuses_a_run_it_has_no_rate_for(monkeypatch):
    """A method the committed results skipped (C3A on the diffusion UNet's convolutions) is skipped again by the
    reduced protocol; one that would train here instead is refused, never trained at a rate nothing chose."""
    from boftlab.reproduce import protocol as proto

    committed = load_results().domains["diffusion"]
    reduced = proto.reduced_protocol(committed)
    c3a = next(m for m in diffusion.DOMAIN.profile_methods("ci") if m.family == "c3a")
    assert c3a.name in reduced.skipped and c3a.name not in reduced.lrs
    skipped = Run(c3a, skipped="skipped: PEFT's C3A adapts plain nn.Linear layers only")
    monkeypatch.setattr(proto, "run_method", lambda *a, **k: skipped)
    result, _ = proto.choose_lr(object(), c3a, reduced, True, progress=False)
    assert result.lr is None and result.skipped.startswith("skipped:")
    monkeypatch.setattr(proto, "run_method", lambda *a, **k: Run(c3a, steps=[1], losses=[1.0], evals=[0.5]))
    with pytest.raises(ValueError, match="committed results skipped it"):
        proto.choose_lr(object(), c3a, reduced, True, progress=False)
