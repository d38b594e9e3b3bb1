"""Is the sparse model faster? Dense jit vs the sparse inference paths of
``autosparse_jax.export``, per batch size, with bytes on disk and in memory.

Models (weights magnitude-pruned per layer to exactly the sparsity, from the initialisation:
timing does not depend on what the weights learned):

* LeNet-300-100 (batch norm, as in ``configs/mnist_lenet300.py``) at 90 / 95 / 98%; the head
  (100x10) is pruned too;
* with ``--workdir``: the latest checkpoint of a training run, exported with the command line's
  code, checked (bit-exact reload; the labels of every path equal the dense model's on the whole
  evaluation set) and timed with its trained weights;
* a transformer MLP block ``Dense(d, 4d) -> gelu -> Dense(4d, d)`` (GPT/ViT MLP shape, no
  attention) at 90 / 95 / 98%, ``d`` set by ``--mlp-width`` (default 1024: 8.4M weights; the
  issue's 4096x16384 layers take minutes per point on a loaded 2-core machine).

Arms, each a jitted function of the exported file (``export.encode`` of the pruned variables):

* ``dense``: ``model.apply`` under ``jax.jit`` with the dense variables (the baseline);
* ``BCSR all``: :class:`export.SparseModel` with every Dense layer as a BCSR product;
* ``BCSR auto``: :class:`export.SparseModel` with the default per-layer policy;
* ``scipy all``: :class:`export.HostModel` with every Dense layer as scipy CSR (host callback).

Timing: per (model, sparsity, batch) the arms run interleaved (random order per round, a block
of calls each), median time per call; speedup = dense / arm per round, median over rounds with a
95% bootstrap CI. Every arm's output is checked against the dense one (max abs difference).

  python benchmarks/sparse_inference.py --out benchmarks/results/sparse_inference.json \
      [--workdir=RUN]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from autosparse_jax import export
from autosparse_jax.models import get_model

ARMS = ("dense", "BCSR all", "BCSR auto", "scipy all")
ALL = export.Policy(min_sparsity=0.0, min_size=0)


class MLPBlock(nn.Module):
  """A transformer MLP block: ``Dense(4d) -> gelu -> Dense(d)``."""

  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.gelu(nn.Dense(4 * self.width, name="fc_in")(x))
    return nn.Dense(self.width, name="fc_out")(h)


def magnitude_prune(variables: Any, sparsity: float) -> Any:
  """Every kernel (ndim >= 2) with its ``round(sparsity * size)`` smallest |w| set to 0."""

  def prune(path, w):
    w = np.asarray(w)
    if w.ndim < 2:
      return w
    k = int(round(sparsity * w.size))
    order = np.argsort(np.abs(w), axis=None, kind="stable")
    out = w.copy().reshape(-1)
    out[order[:k]] = 0
    return out.reshape(w.shape)

  return jax.tree_util.tree_map_with_path(prune, variables)


def time_block(fn, x, calls: int) -> float:
  C.block(fn(x))
  start = time.perf_counter()
  for _ in range(calls):
    y = fn(x)
  C.block(y)
  return (time.perf_counter() - start) / calls


def bench_point(model, variables, exported, input_shape, batch, args, log) -> dict[str, Any]:
  rng = np.random.default_rng(batch)
  x = jnp.asarray(rng.standard_normal((batch, *input_shape)), jnp.float32)
  # the variables are an argument, as in the sparse arms (a closure would make them constants)
  dense_apply, on_device = jax.jit(model.apply), jax.device_put(variables)

  def dense_fn(x):
    return dense_apply(on_device, x)

  fns = {
    "dense": dense_fn,
    "BCSR all": export.SparseModel(model, exported, batch_size=batch, policy=ALL),
    "BCSR auto": export.SparseModel(model, exported, batch_size=batch),
    "scipy all": export.HostModel(model, exported, batch_size=batch, policy=ALL),
  }
  ref = np.asarray(dense_fn(x))
  entry: dict[str, Any] = {"batch": batch, "arms": {}}
  for name, fn in fns.items():
    out = np.asarray(fn(x))
    entry["arms"][name] = {
      "max_abs_diff": float(np.max(np.abs(out - ref))),
      "memory_bytes": fn.nbytes() if name != "dense" else int(exported.dense_nbytes()),
      "sparse_layers": [d.path for d in fn.decisions if d.sparse] if name != "dense" else [],
    }
  # a block of calls lasts about block_ms at the dense speed
  per_call = time_block(dense_fn, x, 3)
  calls = max(1, min(200, int(args.block_ms / 1e3 / max(per_call, 1e-6))))
  times = C.interleave(
    {n: functools.partial(time_block, fn, x, calls) for n, fn in fns.items()},
    min_rounds=args.rounds,
    max_rounds=4 * args.rounds,
    budget_s=args.budget_s,
    log=log,
  )
  entry["calls_per_block"] = calls
  for name in fns:
    entry["arms"][name]["times_s"] = times[name]
  return restat_point(entry)


def restat_point(entry: dict[str, Any]) -> dict[str, Any]:
  dense = entry["arms"]["dense"]["times_s"]
  for arm in entry["arms"].values():
    arm["time_s"] = C.quartiles(arm["times_s"])
    arm["speedup"] = C.ratio_stats(dense, arm["times_s"])  # dense / arm, per round
  return entry


def restat(payload: dict[str, Any]) -> dict[str, Any]:
  for case in payload["results"]:
    case["points"] = [restat_point(p) for p in case["points"]]
  return payload


def cases(args) -> list[dict[str, Any]]:
  width = 16 if args.smoke else args.mlp_width
  return [
    {
      "model": "LeNet-300-100",
      "make": lambda: get_model("lenet_300_100", 10),
      "input_shape": (784,),
      "info": {"class": "LeNet300100", "name": "lenet_300_100", "num_classes": 10},
    },
    {
      "model": f"MLP block {width}-{4 * width}-{width}",
      "make": lambda: MLPBlock(width),
      "input_shape": (width,),
      "info": {"class": "MLPBlock"},
    },
  ]


def bytes_on_disk(exported, dense) -> tuple[int, int]:
  with tempfile.TemporaryDirectory() as tmp:
    return export.save(Path(tmp) / "model.npz", exported), export.save(
      Path(tmp) / "dense.npz", dense
    )


def verify_workdir(workdir: str) -> tuple[dict[str, Any], Any, Any]:
  """Exports a training workdir's latest checkpoint and checks it: the file reloads to the
  checkpoint's bits, and every inference path gives the dense model's labels on the whole
  evaluation set. Returns (the checks, the model, the reloaded export)."""
  from autosparse_jax import train
  from autosparse_jax.export.__main__ import export_workdir
  from autosparse_jax.train import config_lib

  config = config_lib.config_from_json((Path(workdir) / "config.json").read_text())
  exp = train.build_experiment(config)
  state = train.load_checkpoint(config, workdir, experiment=exp)
  saved = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
  with tempfile.TemporaryDirectory() as tmp:
    export.save(Path(tmp) / "model.npz", export_workdir(workdir))
    model, exported = export.load_model(Path(tmp) / "model.npz")
  back = exported.variables()
  bit_exact = jax.tree.structure(back) == jax.tree.structure(saved) and all(
    a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(saved), strict=True)
  )
  batch = config.eval_batch_size
  paths = {
    "BCSR all": export.SparseModel(model, exported, batch_size=batch, policy=ALL),
    "BCSR auto": export.SparseModel(model, exported, batch_size=batch),
    "scipy all": export.HostModel(model, exported, batch_size=batch, policy=ALL),
  }
  dense_apply = jax.jit(model.apply)
  dense = functools.partial(dense_apply, jax.device_put(saved))
  same = dict.fromkeys(paths, 0)
  correct = count = 0
  iterator = exp.eval_ds.iterate()
  for b in iterator:
    keep = b["mask"] > 0 if "mask" in b else np.ones(len(b["label"]), bool)
    want = np.asarray(dense(b["image"])).argmax(-1)[keep]
    correct += int((want == b["label"][keep]).sum())
    count += int(keep.sum())
    for name, fn in paths.items():
      same[name] += int((np.asarray(fn(b["image"])).argmax(-1)[keep] == want).sum())
  iterator.close()
  kernels = [leaf for leaf in exported.leaves if len(leaf.shape) >= 2]
  checks = {
    "workdir_config": {"model": config.model, "method": config.method, "dataset": config.dataset},
    "step": exported.model["step"],
    "sparsity": 1 - sum(k.nnz for k in kernels) / sum(k.size for k in kernels),
    "bit_exact_reload": bool(bit_exact),
    "eval_examples": count,
    "eval_accuracy_dense": correct / count,
    "same_labels_as_dense": {name: n / count for name, n in same.items()},
  }
  print(json.dumps(checks, indent=1), flush=True)
  return checks, model, exported


def run(args) -> dict[str, Any]:
  head = C.header()
  sparsities = (0.95,) if args.smoke else tuple(args.sparsity)
  batches = (1, 8) if args.smoke else tuple(args.batch)
  log = print if args.verbose else None
  results, trained = [], None

  def bench(name, model, input_shape, sparsity, weights, variables, exported, dense_export):
    disk, dense_disk = bytes_on_disk(exported, dense_export)
    points = []
    for batch in batches:
      print(f"{name} {sparsity:.1%} batch {batch}", flush=True)
      points.append(bench_point(model, variables, exported, input_shape, batch, args, log))
    results.append(
      {
        "model": name,
        "sparsity": sparsity,
        "weights": weights,
        "bytes_on_disk": disk,
        "dense_bytes_on_disk": dense_disk,
        "bytes_arrays": exported.nbytes(),
        "dense_bytes_arrays": exported.dense_nbytes(),
        "points": points,
      }
    )

  if args.workdir:
    trained, model, exported = verify_workdir(args.workdir)
    variables = exported.variables()
    # the same shapes without zeros: every leaf stored dense, the dense model's file size
    dense_export = export.encode(
      jax.tree.map(lambda x: np.where(x == 0, np.ones_like(x), x), variables), exported.model
    )
    name = f"{type(model).__name__} (trained, {trained['workdir_config']['method']})"
    shape = tuple(exported.model["input_shape"])
    bench(name, model, shape, trained["sparsity"], "trained", variables, exported, dense_export)
  for case in cases(args):
    model = case["make"]()
    example = jnp.zeros((1, *case["input_shape"]), jnp.float32)
    variables = jax.device_get(model.init(jax.random.key(0), example))
    info = {**case["info"], "input_shape": list(case["input_shape"])}
    dense_export = export.encode(variables, info)
    for sparsity in sparsities:
      pruned = magnitude_prune(variables, sparsity)
      bench(
        case["model"],
        model,
        case["input_shape"],
        sparsity,
        "magnitude-pruned initialisation",
        pruned,
        export.encode(pruned, info),
        dense_export,
      )
  return {
    **C.finish(head),
    "benchmark": "sparse_inference",
    "smoke": bool(args.smoke),
    "arms": list(ARMS),
    "policies": {"BCSR auto": export.BCSR_POLICY._asdict(), "scipy": "all Dense layers"},
    "trained_checks": trained,
    "results": results,
  }


def render(payload: dict[str, Any]) -> str:
  rows = []
  for case in payload["results"]:
    for p in case["points"]:
      a = p["arms"]
      rows.append(
        [
          case["model"],
          f"{case['sparsity']:.1%}",
          p["batch"],
          C.fmt_ms(a["dense"]["time_s"]["median"]),
          *(
            f"{a[n]['speedup']['ratio']:.2f}x [{a[n]['speedup']['ci95_lo']:.2f}, "
            f"{a[n]['speedup']['ci95_hi']:.2f}]"
            for n in ARMS[1:]
          ),
          ", ".join(a["BCSR auto"]["sparse_layers"]) or "none",
          f"{case['bytes_on_disk'] / case['dense_bytes_on_disk']:.3f}",
          f"{a['BCSR all']['memory_bytes'] / a['dense']['memory_bytes']:.3f}",
          p["arms"]["dense"]["speedup"]["rounds"],
        ]
      )
  table = C.md_table(
    [
      "model",
      "sparsity",
      "batch",
      "dense ms",
      "BCSR all speedup [95% CI]",
      "BCSR auto speedup",
      "scipy all speedup",
      "auto: sparse layers",
      "disk / dense",
      "memory / dense (BCSR)",
      "rounds",
    ],
    rows,
  )
  checks = ""
  if payload.get("trained_checks"):
    t = payload["trained_checks"]
    same = ", ".join(f"{k} {v:.2%}" for k, v in t["same_labels_as_dense"].items())
    checks = (
      f"\nTrained model ({t['workdir_config']}, step {t['step']}, {t['sparsity']:.2%} sparse): "
      f"reload bit-exact: {'yes' if t['bit_exact_reload'] else 'NO'}; dense accuracy "
      f"{t['eval_accuracy_dense']:.2%} on {t['eval_examples']} evaluation examples; labels equal "
      f"to the dense model's: {same}.\n"
    )
  smoke = " (SMOKE RUN: tiny sizes, not a measurement)" if payload["smoke"] else ""
  return (
    C.md_header(f"Sparse inference: dense jit vs BCSR vs scipy CSR{smoke}", payload)
    + "\nSpeedup = dense time / arm time (>1: the sparse path is faster), median over "
    "interleaved rounds with a 95% bootstrap CI. Weights: 'trained' rows are the --workdir run's, "
    "the others a magnitude-pruned initialisation. "
    "'BCSR auto' is the default per-layer policy "
    f"{payload['policies']['BCSR auto']}. Disk: the exported .npz against the dense tree's "
    "export; memory: the arrays the BCSR arm holds (dense leaves + BCSR) against the dense "
    "variables.\n" + checks + "\n" + table + "\n"
  )


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 rounds")
  ap.add_argument("--out", default="benchmarks/results/sparse_inference.json")
  ap.add_argument("--mlp-width", type=int, default=1024)
  ap.add_argument("--sparsity", type=float, nargs="+", default=[0.9, 0.95, 0.98])
  ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--budget-s", type=float, default=4.0, help="per point")
  ap.add_argument("--block-ms", type=float, default=50.0, help="length of one timed block")
  ap.add_argument(
    "--workdir",
    default=None,
    help="a training workdir: export its latest checkpoint, check the file (bit-exact reload, "
    "same labels on the evaluation set) and time it first",
  )
  ap.add_argument("--verbose", action="store_true")
  ap.add_argument("--render", action="store_true", help=C.RENDER_HELP)
  args = ap.parse_args(argv)
  if args.render:
    return C.rerender(args.out, restat, render)
  if args.smoke:
    args.rounds, args.budget_s, args.block_ms = 2, 0.0, 2.0
  payload = run(args)
  markdown = render(payload)
  print(markdown)
  C.write_results(args.out, payload, markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main())
