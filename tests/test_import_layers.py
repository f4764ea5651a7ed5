"""Imports go down only (docs/architecture.md, "Layers"): the kernels know nothing of torch.compile, the passes,
the backend, the layer or the ops; ``contract`` and ``errors``, which the kernels share, import nothing above
them.  Read from the source with ``ast``, so an import inside a function counts too."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# what each group of modules may import from this project
ALLOWED = {
    "kernels": ("moe_passes.kernels", "moe_passes.contract", "moe_passes.errors"),
    "contract": ("moe_passes.errors",),
    "errors": (),
}


def _project_imports(path: pathlib.Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports stay inside their package
                continue
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "moe_passes":  # "from moe_passes import x" imports moe_passes.x
                names = [f"moe_passes.{a.name}" for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n == "moe_passes" or n.startswith("moe_passes.")]
    return found


def _modules(group: str) -> list[pathlib.Path]:
    if group == "kernels":
        return sorted((ROOT / "kernels").glob("*.py"))
    return [ROOT / "moe_passes" / f"{group}.py"]


@pytest.mark.parametrize("group", sorted(ALLOWED))
def test_imports_go_down_only(group):
    bad = []
    for path in _modules(group):
        for line, name in _project_imports(path):
            if not any(name == a or name.startswith(a + ".") for a in ALLOWED[group]):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "imports that go up:\n" + "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from moe_passes.backend import moe_nvfp4_backend\n")
    assert _project_imports(module) == [(2, "moe_passes.backend"), (2, "moe_passes.backend.moe_nvfp4_backend")]
