"""The README's quick start runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs_as_written(tmp_path, monkeypatch):
    section = README.read_text().split("## Quick start")[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README quick start", "exec"), namespace)
    model, reloaded, batch = namespace["model"], namespace["reloaded"], namespace["batch"]
    assert (tmp_path / "my_adapter" / "adapter_model.safetensors").is_file()
    model.eval(), reloaded.eval()
    with torch.no_grad():  # the merged reload predicts what the trained model predicts
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_fine_tuning_tables_are_the_committed_run():
    """Every results and claims table row and every figure of docs/results/ci/results.md (written by ``python -m
    boftlab reproduce``, full protocol) is in the README unchanged, with the command, commit and machine it came
    from (results.json's provenance)."""
    from boftlab.reproduce import load_results

    results = README.parent / "docs" / "results" / "ci"
    text, readme = (results / "results.md").read_text(), README.read_text()
    section = readme.split("## Fine-tuning results")[1].split("\n## ")[0]
    about = load_results(results / "results.json").provenance
    assert all(about[key] in section for key in ("command", "commit", "machine"))
    rows = [line for line in text.split("\n## ", 1)[1].splitlines() if line.startswith("|")]
    assert len(rows) >= 3 * 10 and all(row in section for row in rows)
    for stem in re.findall(r"!\[(\w+)\]", text):
        assert f"](docs/results/ci/{stem}.png)" in section and (results / f"{stem}.png").is_file()


def test_reliability_counts_are_the_catalogues():
    """The Reliability section's counts are those of the bad-input catalogue and the randomized round trips."""
    import test_bad_inputs
    import test_round_trips

    section = README.read_text().split("## Reliability")[1].split("\n## ")[0]
    assert f"{len(test_bad_inputs.CONFIG_CASES)} bad configs" in section
    assert f"{len(test_bad_inputs.MODEL_CASES)} bad calls on a model" in section
    assert f"draws {test_round_trips.N_CASES} seeded random cases" in section
