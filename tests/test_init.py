"""boftlab/__init__.py: the public names, and what ``import boftlab`` loads (torch and the adapters, nothing more)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import boftlab

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = {"matplotlib", "transformers", "diffusers", "timm", "ipywidgets", "pandas", "peft", "sklearn", "datasets",
            "bitsandbytes"}


def run_python(code: str) -> str:
    """stdout of ``code`` in a fresh interpreter (pytest has imported half of these packages already)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_boftlab_loads_no_optional_dependency():
    loaded = run_python(f"import boftlab, sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {OPTIONAL!r}))")
    assert loaded == "[]"


def test_teaching_and_counts_load_on_first_touch():
    out = run_python(
        "import sys, boftlab\n"
        "print('boftlab.teaching' in sys.modules, 'boftlab.counts' in sys.modules)\n"
        "print(boftlab.counts.lora_params(8, 8, 2), type(boftlab.teaching.butterfly.factor_patterns(8, 2, 3)).__name__)\n"
        "print('matplotlib' in sys.modules)"
    )
    assert out.splitlines() == ["False False", "32 Tensor", "True"]


def test_public_names_are_the_contract_the_families_the_model_api_and_the_files():
    assert sorted(boftlab.__all__) == sorted([
        "AdapterConfig", "AdapterLayer", "FAMILIES",
        "BOFTConfig", "OFTConfig", "BOFTLayer", "SURMConfig", "SURMLayer", "SURMAdapterLayer",
        "TensorCoreConfig", "TensorCoreLayer",
        "adapt", "adapter_layers", "summary", "merge", "unmerge", "unwrap", "disabled", "dequantize_bases",
        "save_adapter", "load_adapter", "save_merged", "save_checkpoint", "load_checkpoint", "from_peft", "to_peft",
    ])
    assert all(getattr(boftlab, name) is not None for name in boftlab.__all__)
    for helper in ("StructuredMatrix", "approximation_error", "displacement_rank", "mode_product", "tucker_delta"):
        assert not hasattr(boftlab, helper), helper  # family helpers live in their modules (boftlab.surm.…)
    assert boftlab.surm.StructuredMatrix and boftlab.tensor_core.mode_product


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        boftlab.no_such_name
