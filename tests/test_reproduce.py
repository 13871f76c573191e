"""The reproduction runner on tiny settings: it runs, measures, and writes results.md and PNGs from the run."""

import math
import re
import sys

import pytest
import torch

from boftlab.__main__ import main as cli
from boftlab.reproduce import DOMAINS, diffusion, llm, reproduce, runner, vit
from boftlab.reproduce.runner import Method, Task, lr_factor, run_method, stratified_split

TINY_VIT = vit.Settings(steps=4, batch_size=16, eval_every=2)
BOFT = Method("BOFT b=8 m=2", "boft", {"block_size": 8, "n_factors": 2}, vit.CI_LINEARS, lr=3e-3)
LORA = Method("LoRA r=4 (PEFT)", "lora", {"r": 4, "lora_alpha": 8}, vit.CI_LINEARS, lr=3e-3)


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
    monkeypatch.setenv("BOFTLAB_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data/scripts"):
        vit.load_ci_vit()


# --- the pieces of the loop -------------------------------------------------------------------------------------------
def test_lr_factor_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 100, 10) for s in range(101)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[100] == pytest.approx(0.0, abs=1e-12)


def test_batch_indices_repeat_exactly_and_cover_an_epoch():
    first = [runner.batch_indices(50, 10, s, seed=3) for s in range(5)]
    again = [runner.batch_indices(50, 10, s, seed=3) for s in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert sorted(torch.cat(first).tolist()) == list(range(50))


def test_stratified_split_is_disjoint_and_keeps_class_shares():
    labels = torch.tensor([0] * 10 + [1] * 20)
    train, test = stratified_split(labels, 0.5, seed=0)
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(train) + len(test) == 30
    assert (labels[test] == 0).sum() == 5 and (labels[test] == 1).sum() == 10


def test_digits_are_the_bundled_classes_in_unit_range():
    images, labels = runner.digits([5, 6])
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
    assert run.ms_per_step > 0 and run.peak_mib is None  # CPU: peak memory is not measured
    assert run.losses != run_method(vit_task, BOFT, progress=False).losses


def test_method_without_its_package_is_skipped_with_its_reason(vit_task, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # PEFT not installed: importing it raises ImportError
    run = run_method(vit_task, LORA, progress=False)
    assert run.skipped and "PEFT is not importable here" in run.skipped and "pip install peft" in run.skipped
    assert f"| {LORA.name} | skipped: " in runner.results_table([run], "accuracy")


def test_every_boftlab_family_is_a_method_family():
    """The runner names families as the contract does: one registry (contract.FAMILIES)."""
    from boftlab.contract import FAMILIES

    assert runner.method_families() == ("head", "full", "lora", *FAMILIES)
    assert {"boft", "oft", "surm", "tensor_core"} <= set(FAMILIES)


def test_results_md_and_pngs_carry_the_run_numbers(tmp_path, monkeypatch):
    monkeypatch.setitem(vit.SETTINGS, "ci", TINY_VIT)
    monkeypatch.setitem(vit.DOMAIN.methods, "ci", lambda: [Method("head only", "head"), LORA])
    report = vit.run("ci", progress=False)
    path = runner.write_results([report], tmp_path, "ci", "test")
    text = path.read_text()
    for run in report.runs:
        row = next(line for line in text.splitlines() if line.startswith(f"| {run.method.name} |"))
        assert f"| {run.final:.3g} |" in row and f"{run.trainable:,}" in row
    assert re.search(r"measured on: .*torch .*\d{4}-\d\d-\d\d", text)
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
    assert run.extra["samples_before"].shape == (6, 1, 8, 8) and 0.0 <= run.final <= 1.0
    assert sum(run.extra["labels"]) == 6 and run.final == pytest.approx(run.extra["target_rate"] * run.extra["coverage"])
    assert diffusion.diversity_table(report.runs).splitlines()[2].startswith("| BOFT |")
    assert set(report.figures) == {"diffusion_curves", "diffusion_samples"}


@pytest.mark.parametrize("profile", ["ci", "colab"])
@pytest.mark.parametrize("module", [vit, llm, diffusion])
def test_every_domain_compares_the_issue_families(module, profile, monkeypatch):
    monkeypatch.setattr(diffusion, "_gpu_gib", lambda: 80.0)  # colab diffusion lists full fine-tuning on big GPUs
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
        patch.setattr(datasets, "load_dataset", lambda name: {"train": split(12), "test": split(6)})
        s = vit.Settings(steps=2, batch_size=4, eval_every=2, train_size=12, test_size=6)
        return vit.make_task("colab", s)[0]


@pytest.mark.parametrize("method", [
    pytest.param(m, id=m.name) for m in vit.colab_methods()  # tensor_core: transformers reads projection.weight.dtype
])
def test_colab_vit_path_runs_on_a_tiny_stand_in(colab_vit_task, method):
    run = run_method(colab_vit_task, method, progress=False)
    assert not run.skipped and (run.method_params > 0 or method.family == "head")
    assert run.eval_steps == [0, 2] and 0.0 <= run.final <= 1.0


def test_colab_llm_path_runs_on_a_tiny_stand_in(monkeypatch):
    import datasets
    import transformers

    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(runner.pretrained_dir(llm.CHECKPOINT) / "tokenizer.json"), eos_token="<|endoftext|>")
    config = transformers.Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda name: tokenizer)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda name: transformers.Qwen2ForCausalLM(config))
    rows = {"instruction": ["Name a colour.", "Add the numbers.", "Say hi."] * 2,
            "input": ["", "2 and 3", ""] * 2, "output": ["Blue.", "5", "Hi!"] * 2}
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.Dataset.from_dict(rows))
    s = llm.Settings(steps=2, batch_size=2, context=48, eval_every=2, train_examples=4, test_examples=2)
    task, _ = llm.make_task("colab", s)
    ids, labels = llm.alpaca_example(rows_first := {k: v[1] for k, v in rows.items()}, tokenizer, 48)
    assert labels[-1] == tokenizer.eos_token_id and labels.count(-100) == len(ids) - len(
        tokenizer(rows_first["output"] + tokenizer.eos_token)["input_ids"])
    for method in llm.colab_methods():
        run = run_method(task, method, progress=False)
        assert not run.skipped and run.method_params > 0, method.name
        assert math.isfinite(run.final) and run.final > 1.0


# --- seeds and the diffusion metric ---------------------------------------------------------------------------------------
def finished(name, final, params=100):
    run = runner.Run(Method(name, "head"), method_params=params)
    run.evals = [0.1, final]
    return run


def test_seed_table_reports_mean_and_std_and_names_the_rankings_within_noise():
    by_seed = {0: [finished("a", 0.80), finished("b", 0.70), finished("c", 0.69)],
               1: [finished("a", 0.82), finished("b", 0.74), finished("c", 0.71)],
               2: [finished("a", 0.84), finished("b", 0.72), finished("c", 0.73)]}
    table = runner.seed_table(by_seed, "accuracy")
    lines = table.splitlines()
    assert lines[0] == "| method | params of the method | seed 0 | seed 1 | seed 2 | accuracy: mean ± std |"
    assert lines[2] == "| a | 100 | 0.8 | 0.82 | 0.84 | 0.82 ± 0.02 |"  # best mean first; std with n − 1
    assert lines[3].startswith("| b |") and lines[4].startswith("| c |")
    assert "not separated by 3 seeds): b / c." in table  # 0.72 vs 0.71, std 0.02: within noise; a / b is not


def test_seed_table_refuses_seeds_that_ran_different_methods():
    with pytest.raises(ValueError, match="same methods in the same order"):
        runner.seed_table({0: [finished("a", 0.8)], 1: [finished("b", 0.8)]}, "accuracy")


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
        runner.seed_table({0: [finished("a", 0.8)]}, "accuracy")
