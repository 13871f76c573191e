"""boftlab.teaching.primer: OFT keeps the angles between neurons, LoRA does not; the Cayley transform and its series."""

import torch

from boftlab.butterfly import cayley
from boftlab.teaching import primer


def weight():
    return torch.randn(32, 16, generator=torch.Generator().manual_seed(0))


def test_oft_keeps_every_cosine_and_the_hyperspherical_energy():
    w = weight()
    rotated = primer.oft_weight(w, 4, 0.3, torch.Generator().manual_seed(1))
    assert (rotated - w).norm() > 0.1 * w.norm()  # a real change of the weight ...
    torch.testing.assert_close(primer.neuron_cosines(rotated), primer.neuron_cosines(w), atol=1e-6, rtol=0)  # ... same angles
    assert abs(primer.hyperspherical_energy(rotated) - primer.hyperspherical_energy(w)) < 1e-6 * primer.hyperspherical_energy(w)


def test_lora_of_the_same_size_changes_the_cosines():
    w = weight()
    lora = primer.lora_weight(w, 2, 1.0, torch.Generator().manual_seed(2))
    torch.testing.assert_close((lora - w).norm(), torch.tensor(1.0))
    assert torch.linalg.matrix_rank(lora - w) == 2
    assert (primer.neuron_cosines(lora) - primer.neuron_cosines(w)).abs().max() > 0.01


def test_the_lora_layer_is_peft_at_init():
    layer = primer.lora_layer(weight(), 4, 8)
    assert layer.scaling["default"] == 2.0 and torch.count_nonzero(layer.get_delta_weight("default")) == 0


def test_example_skew_has_its_norm_and_cayley_of_it_is_a_rotation():
    skew = primer.example_skew(8, 0.5)
    torch.testing.assert_close(skew, -skew.T)
    assert abs(skew.norm().item() - 0.5) < 1e-12
    q = cayley(skew)
    assert primer.orthogonality_error(q) < 1e-14 and abs(torch.linalg.det(q).item() - 1) < 1e-12


def test_neumann_errors_fall_with_terms_for_a_small_skew_and_the_figure_draws():
    rows = primer.neumann_errors(8, [0.01, 0.1, 0.5], [2, 4, 6])
    assert all(r["exact"] < 1e-14 for r in rows)
    assert rows[1]["2 terms"] > rows[1]["4 terms"] > rows[1]["6 terms"]
    assert len(primer.plot_neumann_errors(rows).axes[0].lines) == 4


def test_cosine_figure_has_one_panel_per_update():
    w = weight()
    fig = primer.plot_cosine_changes(w, {"OFT": primer.oft_weight(w, 4, 0.1, torch.Generator().manual_seed(3)), "LoRA": w + 1})
    assert len(fig.axes) == 2
