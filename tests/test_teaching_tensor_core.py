"""boftlab.teaching.tensor_core: notebook 06's figures, parameter counts against PEFT, and the digits transfer task
on the reproduction runner."""

import copy

import pytest
import torch
from torch import nn

from boftlab.reproduce.data import digits, stratified_split
from boftlab.reproduce.methods import prepare
from boftlab.reproduce.runner import run_methods
from boftlab.reproduce.task import accuracy
from boftlab.tensor_core import tucker_flops, tucker_n_params
from boftlab.teaching.tensor_core import (
    TARGET_CLASSES,
    Settings,
    flattened_neighbours,
    layer_kind,
    mode_product_steps,
    parameter_counts,
    plot_flattening,
    plot_mode_products,
    pretrain,
    small_cnn,
    transfer_methods,
    transfer_task,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # a tiny CNN (tests/conftest.py)


def test_flattening_puts_vertical_neighbours_k_columns_apart_and_channels_k_squared_apart():
    marks = flattened_neighbours(in_channels=3, kernel_size=5, channel=1, row=2, col=2)
    tap = 25 + 2 * 5 + 2
    assert marks == {"tap": tap, "left": tap - 1, "right": tap + 1, "up": tap - 5, "down": tap + 5,
                     "next channel": tap + 25}
    assert "left" not in flattened_neighbours(2, 3, 0, 0, 0)
    with pytest.raises(ValueError, match="outside a kernel"):
        flattened_neighbours(2, 3, 2, 0, 0)


def test_flattening_figure_has_one_panel_per_channel_and_the_row():
    assert len(plot_flattening(in_channels=4, kernel_size=3).axes) == 5


def test_mode_product_steps_end_at_the_weight_shape_and_sum_to_the_assembly_cost():
    steps = mode_product_steps((64, 32, 3, 3), (8, 4, 3, 3))
    assert [s["shape"] for s in steps] == [(8, 4, 3, 3), (64, 4, 3, 3), (64, 32, 3, 3), (64, 32, 3, 3), (64, 32, 3, 3)]
    assert sum(s["flops"] for s in steps) == tucker_flops((64, 32, 3, 3), (8, 4, 3, 3))


def test_mode_product_figure_and_its_rank_check():
    fig = plot_mode_products((16, 8, 3), 4)
    assert len(fig.axes) == 4 and "(4, 4, 3)" in fig._suptitle.get_text()
    with pytest.raises(ValueError, match="nearest valid"):
        plot_mode_products((16, 8, 3), (4, 9, 3))


def test_parameter_counts_per_layer_kind():
    pytest.importorskip("peft")
    net = nn.Sequential(nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16, 4))
    rows = {r["layer kind"]: r for r in parameter_counts(net, rank=3)}
    assert set(rows) == {"3×3 depthwise conv", "3×3 conv", "Linear"}
    assert rows["3×3 depthwise conv"]["PEFT LoRA"] is None  # PEFT needs r divisible by groups
    assert rows["3×3 depthwise conv"]["tensor-core"] == tucker_n_params((8, 1, 3, 3), (3, 1, 3, 3))
    assert rows["3×3 conv"]["PEFT LoRA"] == 3 * 8 * 9 + 16 * 3  # LoRA on the flattened 16 × 72 matrix
    assert rows["Linear"]["tensor-core"] == tucker_n_params((4, 16), (3, 3))
    assert layer_kind(nn.Conv2d(4, 8, (1, 1), groups=2)) == "1×1 grouped conv"


def test_pretraining_on_digits_0_to_4_learns_the_source_task():
    _, source_accuracy = pretrain(Settings(pretrain_steps=60, steps=1))
    assert source_accuracy > 0.6  # chance is 0.2


def test_transfer_task_tests_on_a_stratified_30_percent_of_digits_5_to_9_relabelled_0_to_4():
    model = small_cnn(width=8).eval()
    s = Settings(pretrain_steps=1, steps=4, eval_every=2)
    task = transfer_task(model, s)
    images, labels = digits(TARGET_CLASSES)
    train, test = stratified_split(labels, 0.3, s.seed)
    assert abs(len(test) / len(labels) - 0.3) < 0.01 and not set(train.tolist()) & set(test.tolist())
    with torch.no_grad():
        assert task.evaluate(model) == accuracy(model(images[test]), labels[test] - 5)
    assert (task.trainable, task.steps, task.eval_every, task.base) == (["head"], 4, 2, model)


def test_transfer_methods_start_at_the_pretrained_model_and_train_only_what_they_say():
    pytest.importorskip("peft")
    model = small_cnn(width=8).eval()
    x = digits(TARGET_CLASSES)[0][:16]
    reference = model(x)
    trainable = {}
    for method in transfer_methods(lora_rank=2, tensor_core_ranks=3):
        adapted = prepare(copy.deepcopy(model), method, ["head"]).eval()
        torch.testing.assert_close(adapted(x), reference)
        trainable[method.family] = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable["head"] == {"head.weight", "head.bias"}
    assert {"head.weight", "head.bias", "conv2.core"} <= trainable["tensor_core"]
    assert "conv2.base_layer.weight" not in trainable["tensor_core"]
    lora = {"base_model.model.conv2.lora_A.default.weight", "base_model.model.conv2.lora_B.default.weight"}
    assert lora <= trainable["lora"] and "base_model.model.conv2.base_layer.weight" not in trainable["lora"]
    assert len(trainable["full"]) == len(list(model.parameters()))


def test_every_transfer_method_runs_on_the_runner_from_the_same_step_0_accuracy():
    pytest.importorskip("peft")
    model = small_cnn(width=8).eval()
    task = transfer_task(model, Settings(pretrain_steps=1, steps=3, eval_every=3))
    runs = run_methods(task, transfer_methods(lora_rank=2, tensor_core_ranks=3), progress=False)
    assert not any(r.skipped for r in runs)
    assert len({r.before for r in runs}) == 1 and all(len(r.losses) == 3 for r in runs)
