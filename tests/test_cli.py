"""The commands as a user runs them: real processes, their exit codes, stdout and stderr.

A bad flag, config field or workdir is one line ``error: ...`` on stderr naming the field, the
value and what is accepted, exit code 2, no traceback (``--verbose`` or ``AUTOSPARSE_VERBOSE=1``
shows it); ``--help`` exits 0; what a person reads (progress, summary, tables) is on stdout.
Most cases fail before anything is compiled; one short digits run covers the good path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from autosparse_jax.train import cli, config_lib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT = str(REPO / "configs" / "default.py")
METHODS_TEXT = ", ".join(config_lib.METHODS)  # every accepted name, listed in the error


def command(module: str, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO):
  full_env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  full_env.update({"JAX_PLATFORMS": "cpu", **(env or {})})
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=full_env,
    timeout=600,
  )


def train(*args: str, **kwargs):
  return command("autosparse_jax.train", *args, **kwargs)


def assert_one_error_line(proc, *words: str) -> str:
  """Exit 2, no traceback, stderr ends with the only ``error:`` line, which holds ``words``."""
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  lines = proc.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-4000:]
  for word in words:
    assert word in errors[0], (word, errors[0])
  return errors[0]


# ---------------------------------------------------------------------------------------------
# config errors: one line naming the field, the value and what is accepted


def test_config_typo_names_the_field_and_suggests_the_right_one(tmp_path):
  proc = train(f"--config={DEFAULT}", f"--workdir={tmp_path / 'w'}", "--config.methd=autosparse")
  line = assert_one_error_line(proc, "--config.methd=autosparse", "config.method", "'methd'")
  assert "did you mean config.method?" in line
  assert not (tmp_path / "w").exists()


def test_nested_typo_lists_the_blocks_fields(tmp_path):
  proc = train(
    f"--config={DEFAULT}", f"--workdir={tmp_path / 'w'}", "--config.sparsity.autosparse.alph0=3"
  )
  assert_one_error_line(
    proc, "config.sparsity.autosparse has no field 'alph0'", "alpha0", "threshold_init"
  )


def test_bad_value_lists_the_accepted_values(tmp_path):
  proc = train(f"--config={DEFAULT}", f"--workdir={tmp_path / 'w'}", "--config.method=autosparce")
  assert_one_error_line(proc, "config.method='autosparce'", "must be one of", "'topkast_ga'")
  assert not (tmp_path / "w").exists()


def test_method_hyperparameter_error_is_one_line(tmp_path):
  proc = train(
    f"--config={DEFAULT}",
    f"--workdir={tmp_path / 'w'}",
    "--config.sparsity.autosparse.target_sparsity=1.5",
  )
  assert_one_error_line(proc, "config.sparsity.autosparse", "target_sparsity", "1.5", "[0, 1)")
  assert not (tmp_path / "w").exists()


def test_a_field_of_another_methods_block_is_refused(tmp_path):
  proc = train(
    f"--config={DEFAULT}",
    f"--workdir={tmp_path / 'w'}",
    "--config.method=str",
    "--config.sparsity.autosparse.target_sparsity=0.5",
  )
  assert_one_error_line(
    proc,
    "config.sparsity.autosparse.target_sparsity=0.5",
    "'str'",
    "config.sparsity.str.target_sparsity",
  )


def test_a_wrong_type_an_unknown_flag_and_missing_flags_are_one_line(tmp_path):
  proc = train(f"--config={DEFAULT}", f"--workdir={tmp_path}", "--config.num_train_steps=ten")
  assert_one_error_line(proc, "--config.num_train_steps=ten", "int")
  proc = train(f"--config={DEFAULT}", "--wrkdir=runs/x")
  assert_one_error_line(proc, "wrkdir")
  assert_one_error_line(train(), "--config and --workdir are required")


# ---------------------------------------------------------------------------------------------
# workdirs, checked before anything runs


def _unwritable_dir(tmp_path: Path) -> Path:
  """A directory this process cannot create entries in (a read-only one; as root, /sys)."""
  locked = tmp_path / "read_only"
  locked.mkdir()
  locked.chmod(0o555)
  for candidate in (locked, Path("/sys")):
    try:
      tempfile.TemporaryDirectory(dir=candidate).cleanup()
    except OSError:
      return candidate
  pytest.skip("no unwritable directory here (running as root without a read-only /sys)")


@pytest.mark.parametrize("kind", ["file", "under_a_file", "url", "read_only"])
def test_bad_workdir_is_one_line_and_nothing_is_written(kind, tmp_path):
  afile = tmp_path / "notes.txt"
  afile.write_text("kept\n")
  workdir, words = {
    "file": (str(afile), ["is a file", "pass a directory"]),
    "under_a_file": (str(afile / "run"), ["notes.txt is a file"]),
    "url": ("gs://bucket/run", ["URLs are not supported", "gcsfuse"]),
    "read_only": (None, ["cannot write in", "writable directory"]),
  }[kind]
  if workdir is None:
    workdir = str(_unwritable_dir(tmp_path) / "run")
  before = sorted(p.name for p in tmp_path.rglob("*"))
  proc = train(f"--config={DEFAULT}", f"--workdir={workdir}", "--config.num_train_steps=2")
  assert_one_error_line(proc, f"--workdir={workdir}", *words)
  assert sorted(p.name for p in tmp_path.rglob("*")) == before
  assert afile.read_text() == "kept\n"


# ---------------------------------------------------------------------------------------------
# --help, --verbose


@pytest.mark.parametrize("module", ["autosparse_jax.train", "autosparse_jax.train.compare"])
def test_help_exits_0_on_stdout(module):
  proc = command(module, "--help")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "--workdir" in proc.stdout and "--config" in proc.stdout and "--verbose" in proc.stdout
  assert "error" not in proc.stderr


def test_verbose_flag_and_environment_show_the_traceback(tmp_path):
  args = (f"--config={DEFAULT}", f"--workdir={tmp_path}", "--config.method=autosparce")
  for extra, env in ((["--verbose"], {}), ([], {cli.VERBOSE_ENV: "1"})):
    proc = train(*args, *extra, env=env)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "ConfigError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.method='autosparce'")


# ---------------------------------------------------------------------------------------------
# compare: every method and config checked before anything trains


def test_compare_rejects_an_unknown_method_before_training(tmp_path):
  proc = command(
    "autosparse_jax.train.compare", "--methods=dense,autosparce", f"--workdir={tmp_path}"
  )
  assert_one_error_line(proc, "--methods=dense,autosparce", "'autosparce'", METHODS_TEXT)
  assert list(tmp_path.iterdir()) == []


def test_compare_checks_every_config_before_the_first_run(tmp_path):
  proc = command(
    "autosparse_jax.train.compare",
    "--methods=dense,autosparse",
    "--config.sparsity.autosparse.target_sparsity=1.5",
    f"--workdir={tmp_path}",
  )
  assert_one_error_line(proc, "config.sparsity.autosparse", "target_sparsity", "1.5")
  assert list(tmp_path.iterdir()) == []  # dense was not trained


# ---------------------------------------------------------------------------------------------
# a real run: progress and summary on stdout; then the report command's errors


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("cli") / "digits"
  proc = train(
    f"--config={DEFAULT}",
    f"--workdir={workdir}",
    "--config.num_train_steps=6",
    "--config.warmup_epochs=0",
    "--config.log_every_steps=3",
    "--config.tensorboard=False",
  )
  return proc, workdir


def test_progress_and_summary_go_to_stdout(short_run):
  proc, workdir = short_run
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  out = proc.stdout
  assert "step 3/6 (50.0%): loss " in out and "step 6/6 (100.0%)" in out
  summary = (workdir / "summary.txt").read_text()
  assert summary.strip() in out  # the final summary, as written to the workdir
  assert "eval accuracy" in out and "sparsity (kernels)" in out
  assert "eval accuracy" not in proc.stderr and "step 6/6" not in proc.stderr


def test_report_errors_are_one_line(short_run, tmp_path):
  _, workdir = short_run
  proc = command("autosparse_jax.train.report", f"--workdir={workdir}", "--step=99")
  assert_one_error_line(proc, "no checkpoint at step 99", "there are [", "6]")
  proc = command("autosparse_jax.train.report", f"--workdir={tmp_path / 'missing'}")
  assert_one_error_line(proc, "no such directory", "the --workdir of a run")
  proc = command("autosparse_jax.train.report", "--workdir")
  assert_one_error_line(proc, "--workdir")
  broken = tmp_path / "broken"
  shutil.copytree(workdir, broken)
  (broken / "config.json").write_text('{"model": ')  # torn
  proc = command("autosparse_jax.train.report", f"--workdir={broken}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --workdir={broken}: ")
  proc = command("autosparse_jax.train.report", "--help")
  assert proc.returncode == 0 and "--step" in proc.stdout and "--verbose" in proc.stdout


# ---------------------------------------------------------------------------------------------
# the shared handler, in process


def test_any_exception_with_an_exit_code_is_one_line(capsys):
  class WorkdirBusy(RuntimeError):
    exit_code = 75

  def busy():
    raise WorkdirBusy("/runs/a is used by process 123\n(started 10:00)")

  with pytest.raises(SystemExit) as info:
    cli.handle(busy, verbose=False)
  assert info.value.code == 75
  assert capsys.readouterr().err == "error: /runs/a is used by process 123 (started 10:00)\n"
  with pytest.raises(SystemExit) as info:
    cli.handle(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), verbose=False)
  assert info.value.code == 130
  assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"


def test_unknown_exceptions_keep_their_traceback():
  def bug():
    raise IndexError("a bug")

  with pytest.raises(IndexError):
    cli.handle(bug, verbose=False)


def test_other_methods_block_at_its_default_is_accepted():
  config_lib.check_method_blocks({"sparsity.autosparse.alpha0": 0.5}, ["str"])  # the default
  config_lib.check_method_blocks({"sparsity.str.threshold_init": -3.0}, ["dense", "str"])
  config_lib.check_method_blocks({"sparsity.exclude": ("^head/",)}, ["dense"])
  with pytest.raises(config_lib.ConfigError, match=r"sparsity.topkast.penalty=0.1.*'gmp'"):
    config_lib.check_method_blocks({"sparsity.topkast.penalty": 0.1}, ["dense", "gmp"])


def test_unknown_override_names_the_first_bad_path():
  argv = ["prog", "--config.method=str", "--config.sparsity.str.granularty=channel"]
  error = cli.unknown_override(argv)
  assert isinstance(error, config_lib.ConfigError)
  assert str(error).startswith("--config.sparsity.str.granularty=channel: config.sparsity.str ")
  assert "did you mean config.sparsity.str.granularity?" in str(error)
  assert cli.unknown_override(["prog", "--config.method=str"]) is None
  # model_kwargs' fields come from the config file: blamed only when the error names the key
  argv = ["prog", "--config.model_kwargs.width=0.5"]
  assert cli.unknown_override(argv, IndexError("x")) is None
  error = cli.unknown_override(argv, KeyError("'width'"))
  assert "model_kwargs has no field 'width'" in str(error)
  assert str(error).endswith("""--config.model_kwargs="{'width': 0.5}\"""")
