"""The README's install command works on any machine: no tracked install or config file names a
path of the machine it was written on, or the project itself as a requirement; the notebooks'
install cell installs the package from a clone into an environment that lacks it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# An absolute path (POSIX or Windows) or a file URL inside a requirement or config line.
ABSOLUTE = re.compile(r"(^|[\s=\"'@])(/(?!/)[\w.-]+/|[A-Za-z]:\\|file://)")


def _install_files() -> dict[str, str]:
  """Tracked install and config files, and the notebooks' install cells, by name."""
  files = {p.name: p.read_text() for p in ROOT.glob("requirements*.txt")}
  files["pyproject.toml"] = (ROOT / "pyproject.toml").read_text()
  files[".ci/run"] = (ROOT / ".ci" / "run").read_text()
  for nb in sorted((ROOT / "colabs").glob("*.ipynb")):
    cells = json.loads(nb.read_text())["cells"]
    files[nb.name] = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
  return files


def _offending_lines(text: str) -> list[str]:
  bad = []
  for line in text.splitlines():
    code = line.split("#", 1)[0] if not line.lstrip().startswith("#!") else ""
    if ABSOLUTE.search(code) or re.match(r"\s*(-e|--editable)\s", code):
      bad.append(line)
  return bad


def test_the_checker_catches_what_broke_installs():
  assert _offending_lines("absl-py==2.5.1\n-e /home/someone/autosparse_jax\n")
  assert _offending_lines("x @ file:///opt/wheels/x.whl")
  assert not _offending_lines("# regenerate: pip freeze > /tmp/x\nnumpy==2.1.0\n")


@pytest.mark.parametrize("name", sorted(_install_files()))
def test_install_file_names_no_machine_path(name):
  assert _offending_lines(_install_files()[name]) == [], name


def test_requirements_do_not_require_the_project_and_say_how_they_were_made():
  text = (ROOT / "requirements.txt").read_text()
  names = [re.split(r"[=<>\[ ;@]", line, maxsplit=1)[0].lower() for line in text.splitlines()]
  assert not {"autosparse_jax", "autosparse-jax"} & set(names)
  assert "pip freeze" in text.splitlines()[1] and "--exclude-editable" in text.splitlines()[1]


def test_docs_cited_by_the_project_are_in_it():
  assert (ROOT / "docs" / "recipes.md").is_file()
  for path in [ROOT / "README.md", *ROOT.glob("configs/*.py")]:
    assert "RECIPES.md" not in path.read_text(), path


def test_notebook_install_cell_installs_from_the_clone(tmp_path):
  """A fresh virtualenv that sees the test environment's dependencies but not this package
  runs the notebooks' install cell from inside the clone; afterwards the package imports."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = venv / "bin" / "python"
  purelib = subprocess.run(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  # The dependencies, as a plain path: no .pth of that site-packages runs, so the editable
  # install of this checkout (a .pth finder) stays invisible.
  Path(purelib, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  probe = [python, "-c", "import importlib.util as u; print(u.find_spec('autosparse_jax'))"]
  outside = subprocess.run(probe, cwd=tmp_path, env=env, capture_output=True, text=True)
  assert outside.stdout.strip() == "None", outside.stdout + outside.stderr

  cell = _install_files()["quickstart.ipynb"]
  run = subprocess.run(
    [python, "-m", "IPython", "--colors=NoColor", "-c", cell],
    cwd=ROOT / "colabs",  # the notebook's own folder in the clone
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  check = subprocess.run(
    [python, "-c", "import autosparse_jax, flax; print(autosparse_jax.__file__)"],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
  )
  assert check.returncode == 0, check.stderr
  assert Path(check.stdout.strip()).is_relative_to(ROOT), check.stdout
