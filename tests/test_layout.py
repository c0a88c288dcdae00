"""common/ is the experiment as the scripts run it; tools/ measure and read runs, so common/ imports nothing of tools/."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(source: str) -> set[str]:
    """Every module a source imports, at the top or inside a function, by statement or by importlib with a literal."""
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = getattr(node.func, "attr", getattr(node.func, "id", None))
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                modules.add(node.args[0].value)
    return modules


def test_the_finder_sees_lazy_and_dynamic_imports():
    source = "def f():\n    from tools.benchmark import x\n    import tools.compare\n    importlib.import_module('tools.y')\n"
    assert imported_modules(source) == {"tools.benchmark", "tools.compare", "tools.y"}


def test_common_imports_nothing_from_tools():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path.read_text(encoding="utf-8"))
                                            if m == "tools" or m.startswith("tools."))
        for path in sorted((ROOT / "common").rglob("*.py"))
    }
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_the_engine_is_small_files_and_rebinds_nothing_on_a_model():
    """common/engine/: each file one job, under 200 lines; nowhere in common/ a method bound onto an instance or
    state cached on the model."""
    for path in (ROOT / "common" / "engine").glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) < 200, path.name
    for path in (ROOT / "common").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "MethodType" not in text and "model._" not in text, path.relative_to(ROOT)
