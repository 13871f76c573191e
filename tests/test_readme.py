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
    """Every table row, ranking and figure of docs/results/ci/results.md (written by ``python -m boftlab reproduce``)
    is in the README unchanged, with the machine and date it came from."""
    results = README.parent / "docs" / "results" / "ci"
    text, readme = (results / "results.md").read_text(), README.read_text()
    section = readme.split("## Fine-tuning results")[1].split("\n## ")[0]
    measured = re.search(r"measured on: (.*)\.\n", text).group(1)
    assert measured in section and re.search(r"\d{4}-\d\d-\d\d", measured)
    rows = [line for line in text.splitlines() if line.startswith(("|", "Final "))]
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
