"""specd's top-level packages must not shadow an installed distribution's: transformers 5.25 depends on
Hugging Face's `kernels` package, and specd's kernels folder, when it was named `kernels`, hid it
(transformers failed to import: every model load broke) or was hidden by it (outside the repository)."""
import importlib.util
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]


def test_top_level_packages_are_specd_only():
    includes = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in includes:
        name = pattern.rstrip("*")
        spec = importlib.util.find_spec(name)
        assert spec is not None and Path(spec.origin).resolve().is_relative_to(REPO), (name, spec)


def test_transformers_imports_beside_specd_kernels():
    import specd_kernels  # noqa: F401  (first, as the engine imports it)
    from transformers import LlamaConfig

    assert LlamaConfig(vocab_size=8).vocab_size == 8
