"""boftlab.teaching.expressivity: fitting orthogonal targets with BOFT / OFT (the functions under notebook 04)."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from boftlab.teaching import expressivity as ex
from boftlab.butterfly import BOFTConfig
from boftlab.tensor_core import orthonormal_columns


def _eye(d):
    return torch.eye(d)


def test_random_rotation_is_in_SO_d():
    q = ex.random_rotation(12, torch.Generator().manual_seed(3))
    assert torch.allclose(q @ q.T, _eye(12), atol=1e-5)
    assert torch.linalg.det(q).item() == pytest.approx(1.0, abs=1e-4)


def test_random_rotation_is_the_haar_orthogonal_sample_reflected_onto_SO_d():
    flipped = 0
    for seed in range(6):
        rotation = ex.random_rotation(5, torch.Generator().manual_seed(seed))
        orthogonal = orthonormal_columns(5, 5, torch.float64, None, torch.Generator().manual_seed(seed)).float()
        assert torch.equal(rotation[:, 1:], orthogonal[:, 1:])  # the same draw: only column 0 may change sign
        flipped += torch.equal(rotation[:, 0], -orthogonal[:, 0])
    assert 0 < flipped < 6  # det −1 draws are reflected, det +1 draws kept


def test_nearest_rotation_is_the_polar_factor_in_SO_d():
    torch.manual_seed(0)
    w = torch.randn(10, 10)
    q = ex.nearest_rotation(w)
    assert torch.allclose(q @ q.T, _eye(10), atol=1e-5) and torch.linalg.det(q) > 0
    target = ex.random_rotation(10, torch.Generator().manual_seed(1))
    assert torch.allclose(ex.nearest_rotation(target), target, atol=1e-5)  # a rotation is its own nearest rotation
    assert (w - q).norm() <= (w - target).norm()
    with pytest.raises(ValueError, match="square"):
        ex.nearest_rotation(torch.randn(3, 4))


def test_boft_fits_a_target_of_its_own_structure_and_oft_cannot():
    torch.manual_seed(0)
    source = BOFTConfig(block_size=4, n_factors=3, scale=False).make_layer(nn.Linear(16, 16, bias=False))
    with torch.no_grad():
        source.skew.normal_(std=0.3)
        target = source.rotation()
    same = ex.fit_rotation(target, 4, 3, steps=150, lr=0.1)
    oft = ex.fit_rotation(target, 4, 1, steps=150, lr=0.1)
    assert same.error < 0.05
    assert oft.error > 0.3


def test_error_falls_with_more_factors_for_a_random_target():
    target = ex.random_rotation(16, torch.Generator().manual_seed(0))
    errors = [ex.fit_rotation(target, 2, m, steps=150).error for m in (1, 2, 3, 4)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[0] < ex.relative_error(_eye(16), target)


def test_fit_reports_the_layers_parameter_count_and_restores_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    fit = ex.fit_rotation(ex.random_rotation(16), 4, 2, steps=5)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(threads)
    assert fit.n_params == 2 * 4 * 6 == fit.layer.n_trainable()
    assert fit.name == "BOFT(m=2, b=4)"


def test_factor_path_runs_from_identity_to_the_fit_and_restores_the_layer():
    target = ex.random_rotation(16, torch.Generator().manual_seed(2))
    fit = ex.fit_rotation(target, 2, 4, steps=100)
    before = fit.layer.skew.detach().clone()
    path = ex.factor_path(fit.layer, target)
    assert len(path) == 5 and path[0]["distance_from_identity"] == 0.0
    assert path[0]["error"] == pytest.approx(ex.relative_error(_eye(16), target), abs=1e-6)
    assert path[-1]["error"] == pytest.approx(fit.error, abs=1e-5)
    assert torch.equal(fit.layer.skew, before)
    oft = ex.fit_rotation(target, 16, 1, steps=100)
    assert ex.largest_step(ex.factor_path(oft.layer, target)) == pytest.approx(1.0)  # OFT: one jump, I -> R
    assert ex.largest_step(path) < 1.0


def test_structures_and_frontier():
    grid = ex.structures(16, [2, 8])
    assert grid == [(2, 1), (2, 2), (2, 3), (2, 4), (8, 1), (8, 2)]
    rows = [{"n_params": p, "error": e} for p, e in [(10, 1.0), (20, 1.2), (30, 0.8), (30, 0.9), (40, 0.85)]]
    assert [(r["n_params"], r["error"]) for r in ex.frontier(rows)] == [(10, 1.0), (30, 0.8)]


def test_sweep_and_plots():
    targets = [ex.random_rotation(8, torch.Generator().manual_seed(s)) for s in range(2)]
    rows = ex.sweep(targets, ex.structures(8, [2, 4]), steps=20)
    assert {(r["block_size"], r["n_factors"]) for r in rows} == {(2, 1), (2, 2), (2, 3), (4, 1), (4, 2)}
    fig = ex.plot_expressivity(rows)
    assert len([l for l in fig.axes[0].get_lines()]) == 2
    assert len(ex.plot_factor_paths({"a": [{"distance_from_identity": 0, "error": 1}]}).axes) == 1


def test_explore_expressivity(capsys):
    assert ex.explore_expressivity(16, 4, 2, steps=10) is not None
    assert "free parameters" in capsys.readouterr().out
    assert ex.explore_expressivity(16, 3, 2, steps=10) is None
    assert "Valid block_size" in capsys.readouterr().out


def test_expressivity_axis_labels_only_plain_major_ticks():
    rows = [{"structure": f"s{p}", "block_size": 2, "n_factors": m, "n_params": p, "error": 1 / m}
            for m, p in enumerate([16, 48, 80, 240, 480], 1)]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ex.plot_expressivity(rows)
    FigureCanvasAgg(fig).draw()
    axis = fig.axes[0].xaxis
    assert all(t.get_text() == "" for t in axis.get_minorticklabels())
    labels = [t.get_text() for t in axis.get_majorticklabels() if t.get_text()]
    assert labels and all(label.isdigit() for label in labels)  # "20", "50", "100", … — no 2×10¹ next to 3×10¹
