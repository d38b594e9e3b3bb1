"""What every command shares: flag parsing, up-front workdir checks, and errors as one line.

A command's ``main`` runs through :func:`run` (absl flags: train, compare) or :func:`handle`
(argparse: report). A known error then prints one line on stderr, ``error: <message>``, and
exits with its code; anything else is a bug and keeps its traceback:

* an exception with an integer ``exit_code`` attribute: :class:`CommandError` (bad arguments,
  bad workdir: exit 2), :class:`~autosparse_jax.train.config_lib.ConfigError` (a bad config
  field: exit 2), and any class that carries one (e.g. the training system's run errors);
* the classes of :data:`KNOWN_ERRORS` (a dataset not on disk, a run stopped by non-finite
  losses, Ctrl-C).

``--verbose`` (or ``AUTOSPARSE_VERBOSE=1`` in the environment) also prints the traceback.
``--help`` prints the command's help on stdout and exits 0. What a person reads (progress, the
summary, tables, reports) goes to stdout; logs and errors go to stderr.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from autosparse_jax.data import DatasetUnavailableError

EXIT_USAGE = 2
"""Exit code of a bad argument, flag, config field or workdir."""
VERBOSE_ENV = "AUTOSPARSE_VERBOSE"
VERBOSE_HELP = (
  f"--verbose: on an error, also print its traceback (or set {VERBOSE_ENV}=1 in the environment)"
)
_HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull")


class CommandError(Exception):
  """A bad argument: printed as ``error: <message>``, exit code :data:`EXIT_USAGE`."""

  exit_code = EXIT_USAGE


class WorkdirError(CommandError):
  """``--workdir`` cannot be used (a URL, a file, not writable, missing)."""


class CommandFailed(CommandError):
  """The command could not do what was asked (e.g. read a damaged checkpoint): exit 1."""

  exit_code = 1


KNOWN_ERRORS: list[tuple[type[BaseException], int]] = [
  (DatasetUnavailableError, 1),  # says where the data is looked for and how to prepare it
  (FloatingPointError, 1),  # a run stopped by non-finite losses (the message says what to do)
  (KeyboardInterrupt, 130),
]
"""Exception classes without an ``exit_code`` attribute that are reported as one line, with
their exit codes (first match wins)."""


def exit_code(error: BaseException) -> int | None:
  """The exit code of a known error; None for anything else (a bug: keep the traceback)."""
  code = getattr(error, "exit_code", None)
  if isinstance(code, int) and not isinstance(code, bool):
    return code
  for cls, code in KNOWN_ERRORS:
    if isinstance(error, cls):
      return code
  return None


def one_line(error: BaseException) -> str:
  """The error's message on one line (a KeyError's quotes removed; the class name if empty)."""
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  text = " ".join(str(text).split())
  if not text and isinstance(error, KeyboardInterrupt):
    return "interrupted (Ctrl-C)"
  return text or type(error).__name__


def verbose_requested(argv: Sequence[str]) -> bool:
  """``--verbose`` among the arguments or ``AUTOSPARSE_VERBOSE`` set to a true value."""
  env = os.environ.get(VERBOSE_ENV, "").strip().lower()
  return "--verbose" in argv or env not in ("", "0", "false", "no")


def report(error: BaseException, code: int, verbose: bool) -> NoReturn:
  """Prints ``error: <message>`` (after the traceback if ``verbose``) and exits with ``code``."""
  if verbose:
    traceback.print_exception(error)
  print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
  raise SystemExit(code)


def handle(main: Callable[[], int | None], verbose: bool) -> NoReturn:
  """Runs ``main()`` and exits with its return value, or reports a known error as one line."""
  try:
    code = main()
  except (SystemExit, GeneratorExit):
    raise
  except BaseException as e:  # noqa: BLE001 -- unknown errors are re-raised below
    code = exit_code(e)
    if code is None:
      raise
    report(e, code, verbose)
  raise SystemExit(code or 0)


# ---------------------------------------------------------------------------------------------
# absl commands


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> NoReturn:
  """``absl.app.run(main)`` with: ``--help`` on stdout and exit 0; flag and config-override
  errors as one line and exit 2; ``--verbose``; known errors of ``main`` as one line."""
  from absl import app

  argv = list(sys.argv if argv is None else argv)
  verbose = verbose_requested(argv)
  argv = [a for a in argv if a != "--verbose"]
  if any(a in _HELP_FLAGS for a in argv[1 : argv.index("--") if "--" in argv else None]):
    app.usage(shorthelp="--helpfull" not in argv, writeto_stdout=True)
    print(f"  {VERBOSE_HELP}")
    raise SystemExit(0)
  handle(lambda: app.run(main, argv=argv, flags_parser=parse_flags), verbose)


def parse_flags(argv: list[str]) -> list[str]:
  """``FLAGS(argv)``, every failure raised as a :class:`CommandError` (or, for an unknown
  ``--config.<field>``, a :class:`~autosparse_jax.train.config_lib.ConfigError`)."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 -- a bad flag, or anything a config file raises
    problem = _missing_config_file(argv) or unknown_override(argv, e)
    if problem is None:
      problem = CommandError(_flag_error(e) + " (see --help)")
    raise problem from e


def _flag_error(error: Exception) -> str:
  """absl's message on one line: ``--flag=value: why`` (a config file's traceback cut to its
  last line)."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  head = lines[0].removeprefix("flag ")
  if any(line.startswith("Traceback") for line in lines):
    head = head.split(": Error whilst parsing config file")[0].rstrip(":")
    return f"{head}: {lines[-1].strip()}"
  text = " ".join(" ".join(lines).split()).removeprefix("flag ")
  required = re.findall(r"Flag --(\w+) must have a value other than None", text)
  if required:
    names = " and ".join(f"--{name}" for name in required)
    return f"{names} {'is' if len(required) == 1 else 'are'} required"
  return text


def _missing_config_file(argv: Sequence[str]) -> CommandError | None:
  """``--config=PATH[:variant]`` whose file does not exist."""
  for i, arg in enumerate(argv[1:], 1):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      value = argv[i + 1]
    elif arg.startswith(("--config=", "-config=")):
      value = arg.split("=", 1)[1]
    else:
      continue
    path = value.split(":", 1)[0]
    if not Path(path).is_file():
      return CommandError(f"--config={value}: no such file; pass a config file (configs/*.py)")
  return None


def unknown_override(argv: Sequence[str], error: Exception | None = None) -> Exception | None:
  """A :class:`ConfigError` for the first ``--config.<path>`` whose path is not a field of
  :func:`~autosparse_jax.train.config_lib.base_config`, or, under ``model_kwargs`` (whose
  fields the config file defines), whose name is the missing key of ``error``; None if none."""
  from autosparse_jax.train import config_lib

  base = config_lib.base_config()
  for arg in argv[1:]:
    match = re.match(r"^--?(?:no)?config\.([^=\s]+)(?:=(.*))?$", arg)
    if match is None:
      continue
    path, value = match.group(1), match.group(2)
    node, done = base, []
    shown = f"--config.{path}" + ("" if value is None else f"={value}")
    for part in path.split("."):
      if done == ["model_kwargs"]:
        if isinstance(error, KeyError | AttributeError) and repr(part) in str(error):
          example = f"{{'{part}': {value}}}"
          return config_lib.ConfigError(
            f"{shown}: the config's model_kwargs has no field {part!r}; set the whole dict, "
            f'e.g. --config.model_kwargs="{example}"'
          )
        break
      if not hasattr(node, "keys") or part not in node:
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        block = ".".join(["config", *done])
        close = difflib.get_close_matches(part, fields, n=3)
        hint = f"did you mean {' or '.join(f'{block}.{c}' for c in close)}? " if close else ""
        return config_lib.ConfigError(
          f"{shown}: {block} has no field {part!r}; {hint}{block}'s fields: {', '.join(fields)}"
        )
      node = node[part]
      done.append(part)
  return None


def config_overrides(flag_name: str = "config") -> dict[str, Any]:
  """The ``--config.<path>=value`` overrides given on the command line, by path."""
  from absl import flags
  from ml_collections import config_flags

  return dict(config_flags.get_override_values(flags.FLAGS[flag_name]))


def loaded_config(flag_name: str = "config"):
  """The config of the ``--config`` flag; a config file that could not be loaded is a
  :class:`CommandError`."""
  from absl import flags
  from ml_collections import ConfigDict

  config = flags.FLAGS[flag_name].value
  if not isinstance(config, ConfigDict):
    raise _missing_config_file(["", f"--{flag_name}={flags.FLAGS[flag_name].config_filename}"]) or (
      CommandError(f"--{flag_name}: the config file's get_config() did not return a ConfigDict")
    )
  return config


def no_arguments(argv: Sequence[str]) -> None:
  """Refuses positional arguments (a flag typed without ``--``, a stray word)."""
  if len(argv) > 1:
    raise CommandError(
      f"unexpected arguments {' '.join(argv[1:])!r}: every option is a --flag=value"
    )


# ---------------------------------------------------------------------------------------------
# workdirs


def check_workdir(workdir: str | os.PathLike | None, *, exists: bool = False, write: bool = True):
  """Checks ``--workdir`` before anything runs, leaving nothing behind.

  Args:
    workdir: the flag's value.
    exists: it must be an existing directory (a reader's workdir).
    write: the command writes there: it, or the nearest directory above it that exists (where
      it will be created), must accept a new entry (tried with a temporary directory).

  Returns:
    The workdir as a :class:`~pathlib.Path`.

  Raises:
    WorkdirError: naming the workdir, what is wrong and what is accepted.
  """
  text = "" if workdir is None else os.fspath(workdir)
  if not text:
    raise WorkdirError("--workdir is required: a directory for checkpoints, metrics and reports")
  if "://" in text:
    raise WorkdirError(
      f"--workdir={text}: URLs are not supported; mount the bucket (e.g. gcsfuse) or use a "
      "shared file system and pass its path"
    )
  path = Path(text).expanduser()
  accepted = "the --workdir of a run" if exists else "a directory (created if missing)"
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={text}: is a file; pass {accepted}")
  if exists and not path.is_dir():
    raise WorkdirError(f"--workdir={text}: no such directory; pass {accepted}")
  if not write:
    return path
  existing = path
  while not existing.exists() and existing != existing.parent:
    existing = existing.parent
  if not existing.is_dir():
    raise WorkdirError(
      f"--workdir={text}: {existing} is a file, so the directory cannot be created there"
    )
  try:
    tempfile.TemporaryDirectory(dir=existing, prefix=".autosparse_write_check_").cleanup()
  except OSError as e:
    where = "it" if existing == path else f"{existing}, where it would be created"
    raise WorkdirError(
      f"--workdir={text}: cannot write in {where} ({e.strerror or e}); pass a writable directory"
    ) from None
  return path
