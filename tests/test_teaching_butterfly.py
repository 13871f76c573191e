"""boftlab.teaching.butterfly: the functions under notebooks 02 and 03's widgets — patterns, reachability, figures,
parameter budgets."""

import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from boftlab import counts
from boftlab.teaching import butterfly as figures
from boftlab.butterfly import BOFTConfig, valid_n_factors


def test_factor_patterns_match_the_papers_d8_example():
    # BOFT paper, App. G.1: the three factors of the 8-dimensional butterfly with 2 × 2 blocks.
    patterns = figures.factor_patterns(8, 2, 3).int()
    eye = torch.eye(2, dtype=torch.int)
    assert torch.equal(patterns[0], torch.block_diag(*[torch.ones(2, 2, dtype=torch.int)] * 4))
    assert torch.equal(patterns[1], torch.kron(torch.eye(2, dtype=torch.int), torch.kron(torch.ones(2, 2, dtype=torch.int), eye)))
    assert torch.equal(patterns[2], torch.kron(torch.ones(2, 2, dtype=torch.int), torch.eye(4, dtype=torch.int)))


def test_each_factor_has_b_nonzeros_per_row():
    patterns = figures.factor_patterns(32, 4, 4)
    assert (patterns.sum(-1) == 4).all() and (patterns.sum(-2) == 4).all()


@pytest.mark.parametrize("dim,block_size", [(8, 2), (16, 2), (16, 4), (32, 4), (64, 8), (24, 6)])
def test_reachability_is_complete_exactly_at_log2_d_over_b_plus_one(dim, block_size):
    dense_at = figures.factors_for_dense(dim, block_size)
    assert dense_at == int(math.log2(dim // block_size)) + 1
    for m in valid_n_factors(dim, block_size):
        reach = figures.reachability(dim, block_size, m)
        assert bool(reach.all()) == (m >= dense_at)
        # each factor doubles the reachable set: density b·2^(m−1)/d
        assert figures.density(reach) == pytest.approx(min(1.0, block_size * 2 ** (m - 1) / dim))


def test_dense_butterfly_has_balanced_path_counts():
    # App. G.1 "balanced entry-wise learning rate": every (input, output) pair is joined by the same number of paths
    counts = figures.path_counts(16, 4, 3)[-1]
    assert counts.unique().tolist() == [(4 // 2) ** 2]


def test_pattern_contains_support_of_a_random_boft_rotation():
    layer = BOFTConfig(block_size=4, n_factors=2, scale=False).make_layer(nn.Linear(16, 16))
    with torch.no_grad():
        layer.skew.normal_()
    rotation = layer.rotation()
    pattern = figures.reachability(16, 4, 2)
    assert (rotation[~pattern].abs() < 1e-6).all()  # nothing outside the predicted pattern
    assert (rotation[pattern].abs() > 1e-9).float().mean() > 0.95  # and (generically) everything inside


def test_factors_for_dense_rejects_non_power_of_two_ratio():
    with pytest.raises(ValueError, match="not a power of two"):
        figures.factors_for_dense(24, 2)


def test_invalid_butterfly_raises_with_valid_choices():
    with pytest.raises(ValueError, match=r"Valid block_size for n_factors=2: \[2, 4, 8\]"):
        figures.factor_patterns(16, 3, 2)


def test_plot_factor_patterns_has_two_rows_of_m_axes():
    fig = figures.plot_factor_patterns(16, 2, 4)
    assert len(fig.axes) == 8
    assert fig.axes[-1].get_title().endswith("100% dense")


def test_plot_butterfly_graph_reports_spread_of_the_source():
    fig = figures.plot_butterfly_graph(16, 2, 3, source=5)
    assert "reaches 8/16 outputs" in fig.axes[0].get_title()
    with pytest.raises(ValueError, match="source"):
        figures.plot_butterfly_graph(16, 2, 3, source=16)


def test_plot_reachability_draws_one_curve_per_block_size():
    fig = figures.plot_reachability(32, [2, 4, 8])
    lines = [l for l in fig.axes[0].get_lines() if l.get_linestyle() == "-"]
    assert len(lines) == 3
    assert lines[0].get_ydata()[-1] == 1.0


def test_explore_butterfly_prints_counts_and_reports_invalid_input(capsys):
    fig = figures.explore_butterfly(32, 4, 4)
    out = capsys.readouterr().out
    assert fig is not None and "m·k·b(b−1)/2 = 192" in out and "m·k·b² = 512" in out and "dense" in out
    assert figures.explore_butterfly(16, 3, 2) is None
    assert "Valid block_size" in capsys.readouterr().out


def test_parameter_budget_prints_the_count_of_counts_module(capsys):
    fig = figures.plot_parameter_budget("deberta-v3-base", "boft", block_size=8, n_factors=2)
    out = capsys.readouterr().out
    total = counts.count("deberta-v3-base", "boft", "all linear", block_size=8, n_factors=2, scale=True)
    assert f"{total:,} trainable" in out
    assert len(fig.axes[0].patches) == 6  # one bar per linear layer kind of a DeBERTa block
    title = fig.axes[0].get_title()  # read as a sentence, not a clipped dict (issue 25)
    assert title == ("deberta-v3-base, BOFT b = 8, m = 2, with scale (effective count)\n"
                     f"on all linear: {total:,} trainable")
    assert "{" not in title and all(len(line) <= 70 for line in title.splitlines())
    assert figures.plot_parameter_budget("deberta-v3-base", "boft", block_size=7) is None
    assert "Valid block_size" in capsys.readouterr().out
