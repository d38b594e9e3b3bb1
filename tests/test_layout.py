"""The layout contract (docs/architecture.md): the library never imports the training system,
no import cycles, small modules that each say their job in their first line."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autosparse_jax"
MAX_LINES = 450  # "about 400": a module past this has more than one job


def _module_name(path: Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str) -> set[str]:
  """Every autosparse_jax module ``path`` imports, at module level or inside functions."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
      out.add(base.rstrip("."))
      out |= {f"{base}.{a.name}" for a in node.names}  # `from pkg import module`
  modules = _modules()
  return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
  return {name: _imports(path, name) for name, path in _modules().items()}


LIBRARY_PREFIXES = ("autosparse_jax.train", "autosparse_jax.models", "autosparse_jax.data")


def _is_library(name: str) -> bool:
  return not name.startswith(LIBRARY_PREFIXES) and not name.startswith("autosparse_jax.export")


def test_library_imports_neither_the_training_system_nor_models_nor_data():
  for name, deps in _graph().items():
    if _is_library(name):
      bad = {d for d in deps if not _is_library(d)}
      assert not bad, f"library module {name} imports {sorted(bad)}"


def test_models_and_data_do_not_import_the_training_system():
  for name, deps in _graph().items():
    if name.startswith(("autosparse_jax.models", "autosparse_jax.data")):
      bad = {d for d in deps if d.startswith("autosparse_jax.train")}
      assert not bad, f"{name} imports {sorted(bad)}"


def test_no_import_cycles():
  graph = _graph()
  # A package imports its submodules by design (re-exports); a cycle through a package's
  # __init__ from its own submodules is not a cycle of modules.
  edges = {
    name: {d for d in deps if not name.startswith(d + ".") and not d.startswith(name + ".")}
    for name, deps in graph.items()
  }
  state: dict[str, int] = {}

  def visit(node: str, stack: list[str]) -> None:
    state[node] = 1
    for dep in sorted(edges[node]):
      if state.get(dep) == 1:
        cycle = stack[stack.index(dep) :] + [dep]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if dep not in state:
        visit(dep, [*stack, dep])
    state[node] = 2

  for name in sorted(edges):
    if name not in state:
      visit(name, [name])


def test_the_detector_sees_a_cycle(tmp_path, monkeypatch):
  # The cycle test must be able to fail: two modules importing each other inside functions.
  pkg = tmp_path / "autosparse_jax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text('"""x."""\n')
  (pkg / "a.py").write_text('"""a."""\n\n\ndef f():\n  from autosparse_jax import b\n')
  (pkg / "b.py").write_text('"""b."""\n\nfrom autosparse_jax.a import f\n')
  monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
  with pytest.raises(pytest.fail.Exception, match="import cycle"):
    test_no_import_cycles()


@pytest.mark.parametrize("name", sorted(_modules()))
def test_module_is_small_and_says_its_job(name):
  path = _modules()[name]
  text = path.read_text()
  assert len(text.splitlines()) <= MAX_LINES, f"{path.name}: {len(text.splitlines())} lines"
  doc = ast.get_docstring(ast.parse(text))
  assert doc and doc.splitlines()[0].strip(), f"{name} has no one-line docstring"
