"""The layered architecture (docs/ARCHITECTURE.md): the import-linter contract in pyproject.toml holds, and fails
on an upward import; no import circles between comb_jax modules; imports inside functions only defer heavy optional
libraries; thin entry scripts; the prompt written once."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "comb_jax"
# libraries a function may import itself: heavy or optional, needed only on that path
DEFERRED_LIBRARIES = {"jax", "matplotlib", "uvicorn", "httpx", "tensorstore", "transformers", "datasets", "gguf"}


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the checkout at `root` (its pyproject.toml, its comb_jax: never an installed copy)."""
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; "
                                     "sys.exit(c(['--no-cache']))"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_the_layer_contract_fails_when_a_lower_layer_imports_a_higher_one(tmp_path):
    copy = tmp_path / "checkout"
    shutil.copytree(PACKAGE, copy / "comb_jax", ignore=shutil.ignore_patterns("shipped_models", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    # the model layer reaching up into serving
    (copy / "comb_jax" / "model" / "upward.py").write_text("from comb_jax.serving import pool  # noqa: F401\n")
    result = lint_imports(copy)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and "comb_jax.model.upward -> comb_jax.serving.pool" in result.stdout


def _modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(path: Path):
    """(imported module name, inside a function?) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in inner
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module, id(node) in inner
            for alias in node.names:
                yield f"{node.module}.{alias.name}", id(node) in inner


def test_no_import_circles_between_modules():
    modules = _modules()

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges = {m: set() for m in modules}
    for m, path in modules.items():
        for name, _ in _imports(path):
            target = resolve(name) if name.startswith("comb_jax") else None
            # a package's own __init__ is not an edge of its submodules (Python runs it first anyway)
            if target and target != m and not (m.startswith(target + ".") and modules[target].name == "__init__.py"):
                edges[m].add(target)
    # a circle exists iff some module reaches itself
    for start in modules:
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            assert m != start, f"import circle through {start}"
            if m not in seen:
                seen.add(m)
                todo += edges[m]


def test_imports_inside_functions_only_defer_heavy_optional_libraries():
    found = [(str(path.relative_to(ROOT)), name) for path in [*PACKAGE.rglob("*.py"), ROOT / "train.py",
                                                                ROOT / "serve.py"]
             for name, inside in _imports(path) if inside and name.split(".")[0] not in DEFERRED_LIBRARIES]
    assert not found, found


def test_entry_scripts_are_thin():
    for script in ("train.py", "serve.py"):
        assert len((ROOT / script).read_text().splitlines()) < 80, script


def test_the_prompt_is_written_once():
    """The full-context prompt's wording lives in text/prompt.py only: every other module builds it from there."""
    holders = sorted(str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                     if "Question: " in p.read_text() or '"Context:' in p.read_text())
    assert holders == ["comb_jax/text/prompt.py"], holders


def test_configs_ship_inside_the_package():
    """An installed wheel carries the configs that load its shipped weights: they are the comb_jax.configs package."""
    from comb_jax.config import CONFIG_DIR, available_configs

    assert CONFIG_DIR == PACKAGE / "configs" and (CONFIG_DIR / "__init__.py").is_file()
    shipped = {p.name for p in (PACKAGE / "shipped_models").iterdir() if p.is_dir()}
    assert shipped and shipped <= set(available_configs())
