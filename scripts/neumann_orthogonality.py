"""How far from orthogonal the Cayley–Neumann series gets in real training, and what that does to unmerging.

BOFT b=8 m=2 (the CI method) with ``neumann_terms`` n on the reproduction's pretrained Llama-architecture LM
(``boftlab.reproduce.llm``, its downstream task and batches), trained with AdamW at a few constant learning rates.
After some steps it reports, as a markdown table, the worst adapted layer's

* ‖RᵀR − I‖₂ — the series' distance from orthogonality (exact Cayley: fp32 rounding) — and κ(R), its condition
  number, which bounds what unmerge can recover (module docstring of tests/test_round_trips.py);
* the relative error ‖W_rec − W‖_F / ‖W‖_F of merge → unmerge when Rᵀ is taken as R⁻¹ (what boftlab did before it
  inverted the blocks, and what an orthogonal R would allow);
* the same for ``boftlab.unmerge``, which inverts every block (``butterfly.inverse_transposed_blocks``).

    python scripts/neumann_orthogonality.py                      # n ∈ {exact, 2, 3, 5}, lr ∈ {3e-3, 1e-2, 3e-2}
    python scripts/neumann_orthogonality.py --steps 50 150 --terms 2 --lrs 1e-2

The numbers quoted in the README (Reliability) come from this script.
"""

from __future__ import annotations

import argparse
import copy

import torch
from tqdm.auto import tqdm

import boftlab
from boftlab.reproduce.llm import CI_LINEARS, SETTINGS, ci_task


def worst_layer(model: torch.nn.Module) -> dict[str, float]:
    """Max over the model's BOFT layers of ‖RᵀR − I‖₂, κ(R) and the merge → unmerge error with Rᵀ as the inverse
    and with boftlab's unmerge (a merged copy of the model, unmerged again)."""
    defect, kappa, with_transpose = 0.0, 0.0, 0.0
    for layer in boftlab.adapter_layers(model).values():
        blocks = layer.cayley_blocks().double()
        R = layer.rotate(torch.eye(layer.fan_in, dtype=torch.float64), blocks=blocks)
        defect = max(defect, torch.linalg.matrix_norm(R.T @ R - torch.eye(layer.fan_in, dtype=R.dtype), 2).item())
        kappa = max(kappa, torch.linalg.cond(R).item())
        weight = layer.base_layer.weight.double()
        merged = layer.merged_weights()["weight"].double()
        recovered = (merged / layer.scale.double()[:, None]) @ R  # W' R / s = W Rᵀ R, which is W only if RᵀR = I
        with_transpose = max(with_transpose, ((recovered - weight).norm() / weight.norm()).item())
    merged_copy = boftlab.merge(copy.deepcopy(model))
    boftlab.unmerge(merged_copy)
    exact = max(
        ((merged_copy.get_submodule(name).base_layer.weight.double() - layer.base_layer.weight.double()).norm()
         / layer.base_layer.weight.double().norm()).item()
        for name, layer in boftlab.adapter_layers(model).items()
    )
    return {"defect": defect, "kappa": kappa, "with_transpose": with_transpose, "exact": exact}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--terms", type=int, nargs="+", default=[0, 2, 3, 5], help="neumann_terms; 0: exact Cayley")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50], help="report after these steps")
    args = parser.parse_args()
    task, _ = ci_task(SETTINGS["ci"])
    rows = ["| neumann_terms | lr | steps | ‖RᵀR − I‖₂ | κ(R) | unmerge error, Rᵀ as R⁻¹ | unmerge error, boftlab |",
            "|---|---|---|---|---|---|---|"]
    runs = [(terms, lr) for terms in args.terms for lr in args.lrs]
    for terms, lr in tqdm(runs, desc="runs"):
        torch.manual_seed(task.seed)
        config = boftlab.BOFTConfig(block_size=8, n_factors=2, neumann_terms=terms or None)
        model = boftlab.adapt(copy.deepcopy(task.base), config, targets=CI_LINEARS).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        for step in tqdm(range(1, max(args.steps) + 1), desc=f"n={terms or 'exact'} lr={lr:g}", leave=False):
            loss = task.loss(model, step - 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if step in args.steps:
                with torch.no_grad():
                    worst = worst_layer(model)
                rows.append(f"| {terms or 'exact'} | {lr:g} | {step} | {worst['defect']:.2g} | {worst['kappa']:.3g} | "
                            f"{worst['with_transpose']:.2g} | {worst['exact']:.2g} |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
