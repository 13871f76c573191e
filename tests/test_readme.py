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
