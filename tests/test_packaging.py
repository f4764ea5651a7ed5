"""The repository must never shadow an installed distribution's import name.

transformers imports Hugging Face's ``kernels`` distribution; a repository root on ``sys.path``
(``python -m pytest``, ``python -c``, a notebook started there) must not hand it our ``kernels/`` folder.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _importable_top_level_names(root: pathlib.Path) -> set[str]:
    """Names a root on sys.path would bind as regular modules or packages (namespace folders do not count:
    a regular package later on sys.path beats them)."""
    names = set()
    for entry in root.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return names


def test_only_moe_passes_is_importable_from_the_repository_root():
    assert _importable_top_level_names(ROOT) == {"moe_passes"}


def test_kernels_folder_is_the_package_moe_passes_kernels():
    from moe_passes.kernels import registry

    assert pathlib.Path(registry.__file__).resolve().parent == (ROOT / "kernels").resolve()


def test_import_kernels_in_the_repository_root_gets_the_installed_distribution():
    spec = importlib.util.find_spec("kernels")
    installed = spec is not None and spec.origin is not None and not pathlib.Path(spec.origin).resolve().is_relative_to(ROOT)
    if not installed:
        pytest.skip("no `kernels` distribution installed (transformers >= 5.2x brings one)")
    code = "import kernels; print(kernels.__file__)"
    for env in (dict(os.environ), {**os.environ, "PYTHONPATH": str(ROOT)}):
        result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        assert not pathlib.Path(result.stdout.strip()).resolve().is_relative_to(ROOT), result.stdout


def test_transformers_imports_from_the_repository_root():
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, "-c", "import transformers.integrations.hub_kernels"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
