"""boftlab.teaching.live and its widget: valid pairs only, a short real run, the leaderboard's order by validation
accuracy, the chosen run tested once, the stored baselines' schema and that recomputing one gives the stored
numbers."""

import json

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from matplotlib.figure import Figure

from boftlab.butterfly_structure import valid_block_sizes
from boftlab.reproduce import vit
from boftlab.teaching import live


def test_valid_pairs_are_butterflies_in_every_adapted_layer():
    assert live.fan_ins() == (64, 128)  # qkv, proj, fc1 read 64 features, fc2 reads 128
    pairs = live.valid_pairs()
    assert (8, 2) in pairs and (4, 4) in pairs and (64, 1) in pairs
    assert (128, 1) not in pairs and (8, 5) not in pairs and (3, 1) not in pairs  # > 64; b·2^4 = 128 ∤ 64; 3 ∤ 64
    for b, m in pairs:
        assert all(b in valid_block_sizes(d, m) for d in live.fan_ins())


@pytest.mark.parametrize("pair", [(3, 2), (8, 5), (128, 1)])
def test_a_pair_that_is_not_a_butterfly_is_refused_with_the_valid_ones(pair):
    with pytest.raises(ValueError, match=r"nearest valid pairs: \[.*all valid pairs: \[\(2, 1\)"):
        live.tune(*pair, steps=1)


def test_pair_info_counts_the_adapted_parameters_and_the_density_of_r():
    info = live.pair_info(8, 2)
    # per layer: m·(d/b)·b(b−1)/2 skew entries + an n-vector of scales; qkv 64→192, proj 64→64, fc1 64→128, fc2 128→64
    per_block = 2 * 8 * 28 + 192 + 2 * 8 * 28 + 64 + 2 * 8 * 28 + 128 + 2 * 16 * 28 + 64
    assert info.params == 4 * per_block == 10_752
    assert info.densities == {64: 16 / 64, 128: 16 / 128}  # R mixes chunks of L = b·2^(m−1) = 16 coordinates
    assert info.label() == "b=8, m=2 · 10,752 params · R 25 % dense (d=64), 12.5 % (d=128)"


def test_a_short_live_run_trains_the_real_pretrained_model():
    run = live.tune(8, 2, lr=3e-3, steps=4, seed=0, progress=False)
    assert run.name == "BOFT b=8 m=2" and run.params == 10_752 and run.steps == 4
    assert run.eval_steps == [0, 1, 2, 3, 4] and len(run.losses) == 4
    task = vit.make_task("ci")[0]  # the curves are validation accuracy (task.evaluate), not test accuracy
    with torch.no_grad():
        assert run.validation[0] == pytest.approx(task.evaluate(task.base.eval()), abs=1e-6)  # the new head's start
    assert run.final > run.validation[0] and run.seconds > 0 and run.test is None  # not tested until chosen


def leaderboard_run(name, final, params):
    return live.TuneRun(name, "boft", {}, 3e-3, 10, 0, params, [0, 10], [0.2, final], [1.0] * 10, 1.0)


def test_the_chosen_run_is_the_best_by_validation_and_is_tested_once_then_the_board_closes(monkeypatch):
    board = live.Leaderboard()
    with pytest.raises(ValueError, match="no runs to choose from"):
        board.test_chosen()
    worse = live.tune(8, 2, lr=1e-4, steps=3, seed=0, progress=False)
    better = live.tune(8, 2, lr=3e-3, steps=3, seed=0, progress=False)
    board.add(worse), board.add(better)
    assert better.final > worse.final
    tested = []
    evaluate_kept = live.evaluate_kept
    monkeypatch.setattr(live, "evaluate_kept", lambda task, run: tested.append(run) or evaluate_kept(task, run))
    chosen = board.test_chosen()
    assert chosen is better and 0 < chosen.test <= 1 and worse.test is None
    assert board.test_chosen() is chosen and len(tested) == 1  # once
    table = board.markdown()
    assert f"| {chosen.test:.3f} (chosen) |" in table and table.count("(chosen)") == 1
    with pytest.raises(ValueError, match="this leaderboard is closed: BOFT b=8 m=2 .* Start a new Leaderboard"):
        board.add(leaderboard_run("after the test", 0.99, 1))
    with pytest.raises(ValueError, match="keeps no trained parameters"):
        live.evaluate_test(live.load_baselines()[0])


def test_leaderboard_ranks_by_validation_accuracy_then_fewer_parameters_then_the_earlier_run():
    board = live.Leaderboard()
    assert board.add(leaderboard_run("a", 0.80, 9_000)) == 1
    assert board.add(leaderboard_run("b", 0.85, 12_000)) == 1
    assert board.add(leaderboard_run("c", 0.80, 5_000)) == 2  # ties with a on accuracy, fewer parameters
    assert board.add(leaderboard_run("d", 0.80, 5_000)) == 3  # same as c: the earlier run stays ahead
    assert [r.name for r in board.ranked()] == ["b", "c", "d", "a"]
    table = board.markdown(live.load_baselines())
    assert table.splitlines()[2].startswith("| 1 | b |") and "| baseline (untuned) | head only |" in table
    assert "final validation accuracy" in table.splitlines()[0] and "(chosen)" not in table


def test_stored_baselines_have_the_schema_and_the_methods():
    data = json.loads(live.BASELINES_PATH.read_text())
    assert data["steps"] == live.STEPS and data["seed"] == 0
    runs = live.load_baselines()
    assert [r.name for r in runs] == [m.name for m in live.baseline_methods()]
    for run, method in zip(runs, live.baseline_methods()):
        assert (run.family, run.options, run.lr, run.steps) == (method.family, method.options, method.lr, live.STEPS)
        assert run.eval_steps == list(range(0, live.STEPS + 1, live.STEPS // 10))
        assert len(run.validation) == len(run.eval_steps) and len(run.losses) == live.STEPS and run.test is None
    assert [r.params for r in runs] == [0, 12_288, 9_600]


def test_a_recomputed_baseline_equals_the_stored_one():
    """The stored head-only baseline is what ``live.train`` computes now (validation accuracies exactly: they count
    images; the losses to float32 rounding, which a different thread count can change)."""
    stored = live.load_baselines()[0]
    method = live.baseline_methods()[0]
    run = live.train(method, stored.steps, stored.seed, progress=False)
    assert run.validation == stored.validation and run.params == stored.params
    torch.testing.assert_close(torch.tensor(run.losses), torch.tensor(stored.losses), rtol=1e-5, atol=1e-6)


def test_the_figure_overlays_the_runs_on_the_baselines():
    baselines = live.load_baselines()
    fig = live.plot_runs([leaderboard_run("mine", 0.9, 10_000)], baselines)
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == len(baselines) + 1


def test_the_widget_trains_on_a_click_and_renders_without_an_output_widget_at_display():
    import ipywidgets as widgets

    from boftlab.teaching.widgets import live_tuning

    board = live.Leaderboard()
    box = live_tuning(board)
    pairs, (lr, steps, button, choose), bar, text, image = (box.children[0], box.children[1].children,
                                                            *box.children[2:])
    assert [value for _, value in pairs.options] == live.valid_pairs() and pairs.value == (8, 2)
    assert "10,752 params" in pairs.label and isinstance(bar, widgets.Output) and not bar.outputs
    assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and "baseline" in text.value  # the baselines before any run
    pairs.value, steps.min, steps.value = (4, 4), 1, 2
    button.click()
    (run,) = board.runs
    assert run.name == "BOFT b=4 m=4" and run.steps == 2 and "rank 1 of 1" in text.value
    assert "validation accuracy" in text.value and "(chosen)" not in text.value
    choose.click()
    assert board.chosen is run and run.test is not None and button.disabled and choose.disabled
    assert f"test accuracy {run.test:.3f}" in text.value and "(chosen)" in text.value


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr="0.003"), r"lr must be a finite number, got '0.003' \(str\)"),  # was a raw TypeError
    (dict(lr=float("inf")), r"lr must be a finite number, got inf"),
    (dict(lr=float("nan")), r"lr must be a finite number, got nan"),
    (dict(lr=-0.1), r"lr must be a finite number > 0, e.g. .*got -0.1"),
    (dict(block_size=8.0), r"block_size must be an integer, got 8.0"),
    (dict(n_factors=True), r"n_factors must be an integer, got True"),  # was the pair (8, 1)
    (dict(steps=True), r"steps must be an integer, got True"),
    (dict(steps=0), r"steps must be a positive integer, got 0"),
    (dict(seed="0"), r"seed must be an integer, got '0'"),
    (dict(progress="no"), r"progress must be True or False, got 'no'"),
])
def test_tune_refuses_bad_arguments_before_any_training(kwargs, message, monkeypatch):
    monkeypatch.setattr(live, "run_method", lambda *a, **k: pytest.fail("trained before checking the arguments"))
    arguments = dict(block_size=8, n_factors=2) | kwargs
    with pytest.raises(ValueError, match=message):
        live.tune(**arguments)


def test_the_figure_keeps_every_label_inside_and_readable():
    """The baselines' names were annotations past the axes' right edge, overlapping (issue 25): now one legend."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from notebook_outputs import figure_problems

    baselines = live.load_baselines()
    fig = live.plot_runs([leaderboard_run("mine", 0.9, 10_000)], baselines)
    assert figure_problems(fig) == [] and not fig.axes[0].texts
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()][:len(baselines)] == [
        f"baseline {r.name}: {r.final:.3f}" for r in baselines]
