"""Command line: export the latest (or a given) checkpoint of a training workdir.

  python -m autosparse_jax.export --workdir=/tmp/run --out=/tmp/run.npz [--step=N]

Prints one line per leaf (storage, sparsity, bytes, notes) and the file's size against the
dense tree's. Bad input (no workdir, no checkpoint, an existing ``--out``) is one line on
stderr and exit status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from autosparse_jax.export import format as format_lib
from autosparse_jax.export import tree as tree_lib


class _Parser(argparse.ArgumentParser):
  def error(self, message: str):
    self.exit(
      2,
      f"error: {message} (usage: python -m autosparse_jax.export "
      "--workdir=DIR --out=FILE.npz [--step=N])\n",
    )


def export_workdir(workdir: str, step: int | None = None) -> format_lib.SparseFile:
  """The :class:`~.format.SparseFile` of the checkpoint at ``step`` (default: the latest) of
  a training workdir: params and batch statistics, with the model's identity.

  Raises:
    FileNotFoundError: not a training workdir, or no such checkpoint.
  """
  import jax

  from autosparse_jax import train
  from autosparse_jax.train import config_lib

  config_path = Path(workdir) / "config.json"
  if not Path(workdir).is_dir():
    raise FileNotFoundError(f"--workdir={workdir}: no such directory")
  if not config_path.exists():
    raise FileNotFoundError(f"--workdir={workdir}: no config.json, not a training workdir")
  if step is not None:
    steps = sorted(
      int(d.name) for d in (Path(workdir) / "checkpoints").glob("*") if d.name.isdigit()
    )
    if step not in steps:
      raise FileNotFoundError(f"--step={step}: no checkpoint at that step; there are {steps}")
  config = config_lib.config_from_json(config_path.read_text())
  exp = train.build_experiment(config)
  state = train.load_checkpoint(config, str(workdir), step, experiment=exp)
  variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  model = {
    "class": type(exp.model).__name__,
    "name": config.model,
    "num_classes": int(exp.train_ds.num_classes),
    "kwargs": config.model_kwargs.to_dict(),
    "half_precision": bool(config.half_precision),
    "input_shape": [int(d) for d in exp.train_ds.input_shape],
    "step": int(jax.device_get(state.step)),
  }
  return format_lib.encode(variables, model)


def describe(exported: format_lib.SparseFile) -> list[str]:
  """One line per leaf and a total: how it is stored and why."""
  lines = []
  for leaf in exported.leaves:
    if leaf.storage == "empty":
      continue
    shape = "x".join(map(str, leaf.shape)) or "scalar"
    sparsity = f"{leaf.sparsity:6.1%}" if len(leaf.shape) >= 2 else "      "
    lines.append(
      f"{tree_lib.path_string(leaf.path):<32} {shape:<12} {sparsity} {leaf.storage:<5} "
      f"{leaf.nbytes:>11,} B  {leaf.note}".rstrip()
    )
  kernels = [x for x in exported.leaves if x.storage != "empty" and len(x.shape) >= 2]
  if kernels and not any(x.storage == "csr" for x in kernels):
    lines.append(
      "note: no kernel is sparse enough for CSR to be smaller; the file holds the dense model"
    )
  lines.append(
    f"arrays: {exported.nbytes():,} B ({exported.nbytes() / max(exported.dense_nbytes(), 1):.3f}"
    f" of the dense {exported.dense_nbytes():,} B)"
  )
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(prog="python -m autosparse_jax.export", description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a training run's --workdir")
  parser.add_argument("--out", required=True, help="the file to write (.npz); must not exist")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  args = parser.parse_args(argv)
  out = Path(args.out)
  try:
    if out.exists():
      raise FileExistsError(f"--out={out} exists; not overwriting it")
    if not out.parent.is_dir():
      raise FileNotFoundError(f"--out={out}: directory {out.parent} does not exist")
    exported = export_workdir(args.workdir, args.step)
    size = format_lib.save(out, exported)
  except (OSError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print("\n".join(describe(exported)))
  print(f"wrote {out} ({size:,} bytes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
