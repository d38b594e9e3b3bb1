"""Sparsity-accuracy on MNIST: LeNet-300-100 and LeNet-5, dense and every method at 90/95/98%.

Every method runs in the same framework, with the same model, data order, optimizer and
schedule; only ``method`` differs:

* ``gmp``: GradualMagnitude to the target on the ramp below;
* ``str`` and ``autosparse``: learned thresholds steered to the target by the sparsity
  controller (``target_sparsity``) on the same ramp; AutoSparse anneals alpha with the paper's
  sigmoid-cosine decay (alpha0 = 0.5, zero from 90% of training);
* ``topkast``: fixed per-layer budget from step 0, backward density twice the forward density
  (TopKAST's 90/80 setting); ``topkast_pp``: the same through Powerpropagation (exponent 2);
* ``topkast_ga``: GA with the same alpha schedule on every weight outside the forward set
  (dense backward); ``topkast_ga_ba``: GA on ``B \\ A`` only (backward density twice the
  forward); ``topkast_ste``: the dense backward without annealing (alpha = 1), GA's control;
* ``rigl``, ``set``, ``mest`` (EM) and ``rigl_ga``, ``mest_ga``: uniform budget from step 0,
  rewired every 100 steps until 75% of training (RigL: drop 0.3 cosine; MEST: mutation 0.05).

Sparsity is measured from the actual zeros of the final params over all kernels. Han et al.
(2015), the reference point: LeNet-300-100 at 8% of weights kept (92% sparse) 1.59% error,
LeNet-5 at 8% kept 0.77% error; dense 1.64% / 0.80%.

Usage:
  python benchmarks/mnist_sparsity_accuracy.py --models lenet_300_100 --seeds 0 1 2
  python benchmarks/mnist_sparsity_accuracy.py --smoke          # seconds, for CI
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import autosparse_jax as autosparse
from autosparse_jax import flops
from autosparse_jax.models import get_model

METHODS = (
  "gmp",
  "str",
  "autosparse",
  "topkast",
  "topkast_ga",
  "topkast_ga_ba",
  "topkast_ste",
  "topkast_pp",
  "rigl",
  "rigl_ga",
  "set",
  "mest",
  "mest_ga",
)
SPARSITIES = (0.90, 0.95, 0.98)
HAN_2015_ERROR = {"lenet_300_100": (1.64, 1.59), "lenet5": (0.80, 0.77)}  # dense, 92% sparse


def load_mnist(path: Path | None, smoke: bool):
  if smoke and (path is None or not path.exists()):
    rng = np.random.default_rng(0)  # synthetic stand-in: a linear rule over random images
    x = rng.random((1200, 28, 28, 1), np.float32)
    w = rng.normal(size=(784, 10))
    y = (x.reshape(len(x), -1) @ w).argmax(-1).astype(np.int32)
    return x[:1000], y[:1000], x[1000:], y[1000:]
  if path is None or not path.exists():
    sys.exit(f"MNIST npz not found at {path}: pass --mnist PATH (format of shared/data/mnist.npz)")
  d = np.load(path)
  prep = lambda a: (a.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)  # noqa: E731
  return prep(d["x_train"]), d["y_train"].astype(np.int32), prep(d["x_test"]), d["y_test"]


def make_method(name: str, sparsity: float, steps: int):
  ramp = autosparse.ramp(steps // 20, int(steps * 0.6))
  alpha = autosparse.sigmoid_cosine_decay(0.5, steps, zero_at=int(steps * 0.9))
  backward = 1.0 - 2.0 * (1.0 - sparsity)
  if name == "dense":
    return autosparse.Dense()
  if name == "gmp":
    return autosparse.GradualMagnitude(
      sparsity, begin_step=steps // 20, end_step=int(steps * 0.6), frequency=max(steps // 100, 1)
    )
  if name == "str":
    return autosparse.STR(target_sparsity=sparsity, target_ramp=ramp)
  if name == "autosparse":
    return autosparse.AutoSparse(alpha=alpha, target_sparsity=sparsity, target_ramp=ramp)
  if name == "topkast":
    return autosparse.TopKAST(sparsity, backward)
  if name == "topkast_ga":
    return autosparse.TopKAST(sparsity, alpha=alpha)
  if name == "topkast_ga_ba":
    return autosparse.TopKAST(sparsity, backward, alpha=alpha)
  if name == "topkast_ste":
    return autosparse.TopKAST(sparsity, 0.0, alpha=1.0)
  if name == "topkast_pp":
    return autosparse.Powerprop(autosparse.TopKAST(sparsity, backward), exponent=2.0)
  dst = dict(end_step=int(steps * 0.75), update_every=100)
  if name in ("rigl", "rigl_ga"):
    return autosparse.RigL(sparsity, alpha=alpha if name == "rigl_ga" else None, **dst)
  if name == "set":
    return autosparse.SET(sparsity, **dst)
  if name in ("mest", "mest_ga"):
    return autosparse.MEST(sparsity, alpha=alpha if name == "mest_ga" else None, **dst)
  raise ValueError(f"method: unknown {name!r}")


def run(model_name, method_name, sparsity, seed, data, epochs, batch_size):
  xtr, ytr, xte, yte = data
  model = get_model(model_name, 10, batch_norm=False)
  steps_per_epoch = len(xtr) // batch_size
  steps = epochs * steps_per_epoch
  params = model.init(jax.random.key(seed), xtr[:1])["params"]
  lr = optax.cosine_decay_schedule(0.05, steps)
  decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
  base = optax.chain(optax.add_decayed_weights(5e-4, mask=decay_mask), optax.sgd(lr, 0.9))
  tx = autosparse.optax_chain(base, make_method(method_name, sparsity, steps))
  state = tx.init(params)
  params = tx.effective_params(params, state)  # step 0 on W_eff
  xtr_d, ytr_d = jnp.asarray(xtr), jnp.asarray(ytr)

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  # One jitted step per batch, not a scan over the epoch: XLA:CPU runs LeNet-5's convolutions
  # about 5x slower inside a scan's while loop than as a top-level computation.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, idx):
    grads = jax.grad(loss_fn)(params, xtr_d[idx], ytr_d[idx])
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  start = time.perf_counter()
  for _ in range(epochs):
    perm = rng.permutation(len(xtr))[: steps_per_epoch * batch_size]
    for idx in jnp.asarray(perm.reshape(steps_per_epoch, batch_size)):
      params, state = step(params, state, idx)
  predict = jax.jit(lambda p, x: model.apply({"params": p}, x).argmax(-1))
  correct = sum(
    int(np.sum(np.asarray(predict(params, xte[i : i + 1000])) == yte[i : i + 1000]))
    for i in range(0, len(xte), 1000)
  )
  return {
    "model": model_name,
    "method": method_name,
    "target": sparsity,
    "seed": seed,
    "error": 100.0 * (1 - correct / len(xte)),
    "sparsity": float(autosparse.sparsity(params).total),
    "layers": {k: float(v) for k, v in autosparse.sparsity(params).layers.items()},
    "steps": steps,
    "seconds": time.perf_counter() - start,
  }


def dense_macs(model_name: str) -> dict[str, int]:
  """Dense MACs per example of each kernel ('conv1/kernel'), traced (nothing computed)."""
  model = get_model(model_name, 10, batch_norm=False)
  example = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), example)
  counts = flops.count_macs(model.apply, variables, example, batch_size=1)
  return {k.removeprefix("params/"): int(v) for k, v in counts.items()}


def inference_macs_ratio(layers: dict[str, float], macs: dict[str, int]) -> float:
  """Sparse / dense MACs of one example: sum_l MACs_l (1 - s_l) / sum_l MACs_l."""
  return sum(m * (1.0 - layers.get(k, 0.0)) for k, m in macs.items()) / sum(macs.values())


def aggregate(rows):
  groups = {}
  for r in rows:
    groups.setdefault((r["model"], r["method"], r["target"]), []).append(r)
  macs = {model: dense_macs(model) for model, _, _ in groups}
  table = []
  for (model, method, target), rs in groups.items():
    err = np.array([r["error"] for r in rs])
    sp = np.array([r["sparsity"] for r in rs])
    table.append(
      {
        "model": model,
        "method": method,
        "target": target,
        "seeds": len(rs),
        "error_mean": float(err.mean()),
        "error_std": float(err.std(ddof=1)) if len(rs) > 1 else 0.0,
        "sparsity_mean": float(sp.mean()),
        "off_target": float(np.abs(sp - target).max()) if target else 0.0,
        "steps": int(rs[0]["steps"]),
        "seconds_mean": float(np.mean([r["seconds"] for r in rs])),
        "inference_macs_ratio": float(
          np.mean([inference_macs_ratio(r["layers"], macs[model]) for r in rs])
        ),
      }
    )
  return table


def markdown(table, meta):
  lines = [
    f"Command: `{meta['command']}`  ",
    f"Machine: {meta['machine']}; jax {meta['jax']} ({meta['backend']}); {meta['date']}; "
    f"{meta['epochs']} epochs, batch {meta['batch_size']}",
    "",
    "| model | method | target | seeds | steps | wall time / run | test error % (mean ± std) "
    "| sparsity | max off-target | inference MACs (of dense) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for t in sorted(table, key=lambda t: (t["model"], t["target"], t["method"])):
    lines.append(
      f"| {t['model']} | {t['method']} | {t['target']:.2f} | {t['seeds']} | {t['steps']:,} | "
      f"{t['seconds_mean'] / 60:.1f} min | {t['error_mean']:.2f} ± {t['error_std']:.2f} | "
      f"{t['sparsity_mean']:.4f} | {t['off_target']:.4f} | {t['inference_macs_ratio']:.1%} |"
    )
  return "\n".join(lines) + "\n"


def plot(table, path):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  models = sorted({t["model"] for t in table})
  fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
  for ax, model in zip(axes[0], models, strict=True):
    rows = [t for t in table if t["model"] == model]
    for method in ("dense", *METHODS):
      pts = sorted(
        (t["sparsity_mean"], t["error_mean"], t["error_std"]) for t in rows if t["method"] == method
      )
      if pts:
        s, e, d = zip(*pts, strict=True)
        ax.errorbar(s, e, yerr=d, marker="o", capsize=3, label=method)
    if model in HAN_2015_ERROR:
      ax.plot([0.92], [HAN_2015_ERROR[model][1]], "k*", markersize=12, label="Han et al. 2015")
    ax.set(
      title=f"MNIST {model}", xlabel="sparsity (fraction of zero weights)", ylabel="test error %"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  default_npz = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
  parser.add_argument(
    "--mnist", type=Path, default=Path(os.environ.get("AUTOSPARSE_MNIST_NPZ", default_npz))
  )
  parser.add_argument("--models", nargs="+", default=["lenet_300_100", "lenet5"])
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--epochs", type=int, default=20)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument(
    "--smoke", action="store_true", help="2 tiny runs on synthetic data if needed"
  )
  parser.add_argument(
    "--render",
    action="store_true",
    help="run nothing: tabulate the runs finished so far (<out>.runs.jsonl, else <out>)",
  )
  parser.add_argument(
    "--out", type=Path, default=Path("benchmarks/results/mnist_sparsity_accuracy.json")
  )
  args = parser.parse_args()
  if args.smoke:
    args.models, args.methods, args.sparsities, args.seeds = (
      ["lenet_300_100"],
      ["autosparse"],
      [0.9],
      [0],
    )
    args.epochs = 1
  data = load_mnist(args.mnist, args.smoke)
  if args.smoke:
    data = tuple(a[:1000] for a in data[:2]) + tuple(a[:500] for a in data[2:])
  args.out.parent.mkdir(parents=True, exist_ok=True)
  # Finished runs are appended here as they end, so an interrupted sweep resumes where it stopped.
  partial = args.out.with_suffix(".runs.jsonl")
  rows = [json.loads(line) for line in partial.read_text().splitlines()] if partial.exists() else []
  if args.render and not rows:
    if not args.out.exists():
      sys.exit(f"--render: neither {partial} nor {args.out} exists")
    rows = json.loads(args.out.read_text())["runs"]
  done = {(r["model"], r["method"], r["target"], r["seed"]) for r in rows}
  # Seed-major order: a sweep cut short still has every configuration at the first seeds.
  jobs = [
    job
    for s in args.seeds
    for m in args.models
    for job in [(m, "dense", 0.0, s)]
    + [(m, meth, sp, s) for sp in args.sparsities for meth in args.methods]
  ]
  for i, (model, method, target, seed) in enumerate(jobs, 1):
    if args.render or (model, method, target, seed) in done:
      continue
    r = run(model, method, target, seed, data, args.epochs, args.batch_size)
    rows.append(r)
    with partial.open("a") as f:
      f.write(json.dumps(r) + "\n")
    print(
      f"[{i}/{len(jobs)}] {model} {method} target={target:.2f} seed={seed}: "
      f"error {r['error']:.2f}% sparsity {r['sparsity']:.4f} ({r['seconds']:.0f}s)",
      flush=True,
    )
  table = aggregate(rows)
  meta = {
    "command": "python " + " ".join(a for a in sys.argv if a != "--render"),
    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "date": datetime.date.today().isoformat(),
    "epochs": args.epochs,
    "batch_size": args.batch_size,
  }
  args.out.write_text(json.dumps({"meta": meta, "table": table, "runs": rows}, indent=1))
  partial.unlink(missing_ok=True)
  args.out.with_suffix(".md").write_text(markdown(table, meta))
  plot(table, args.out.with_suffix(".png"))
  print(markdown(table, meta))


if __name__ == "__main__":
  main()
