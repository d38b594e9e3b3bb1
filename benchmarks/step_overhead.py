"""Full-train-step overhead of ``autosparse.optax_chain(base, method)`` over ``base`` alone.

One jitted train step (forward, backward with batch-norm statistics updated, optimizer update,
``optax.apply_updates``; params, batch stats and optimizer state donated) of the same model on
the same batch, once per optimizer ("arm"). The arms run interleaved in one process: every round
runs each arm for one block of steps, in a random order, and the per-step time of the block is
recorded. Reported: the median step time per arm and ``ratio`` = the median over rounds of
chain / base within the round, with a 95% bootstrap interval (rounds resampled) and the
quartiles of the per-round ratios. GitHub issue 6's goal: within 5% of dense (ratio <= 1.05).
``--render`` recomputes the statistics and the table from the raw times in ``--out``.

The optimizer's cost does not depend on the batch while the model's does, so the ratio is
worst at small batches: ResNet-50 is run at batch 2 (224x224 by default), where the update is
the largest share of the step.

  python benchmarks/step_overhead.py --out benchmarks/results/step_overhead.json
  python benchmarks/step_overhead.py --smoke --out /tmp/step_overhead.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any, NamedTuple

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

import autosparse_jax as autosparse
from autosparse_jax.models import TRANSFORMER_PRUNABLE, get_model


class ModelCase(NamedTuple):
  name: str  # registry name
  label: str  # what the table says
  num_classes: int  # classes, or a GPT's vocabulary
  input_shape: tuple[int, ...]  # NHWC images or (batch, length) tokens
  budget_s: float  # interleaved timing budget (compilation not included)
  min_rounds: int
  overrides: tuple[tuple[str, Any], ...] = ()  # get_model keyword overrides

  @property
  def tokens(self) -> bool:
    return self.name.startswith("gpt")

  @property
  def prunable(self):
    """Transformers prune attention and MLP kernels only; the others every kernel."""
    return TRANSFORMER_PRUNABLE if self.name.startswith(("gpt", "vit")) else None


def cases(args) -> list[ModelCase]:
  if args.smoke:
    # The smallest model (fastest to compile), 3 rounds: checks the script, not the speed.
    return [ModelCase("lenet_300_100", "LeNet-300-100 (smoke)", 10, (8, 784), 0.0, 3)]
  hw, b = args.resnet50_size, args.resnet50_batch
  all_cases = {
    "lenet_300_100": ModelCase(
      "lenet_300_100", "LeNet-300-100, MNIST 784, batch 128", 10, (128, 784), 45, 10
    ),
    "lenet5": ModelCase(
      "lenet5", "LeNet-5, MNIST 28x28x1, batch 128", 10, (128, 28, 28, 1), 45, 10
    ),
    "resnet20": ModelCase(
      "resnet20", "ResNet-20, CIFAR 32x32x3, batch 32", 10, (32, 32, 32, 3), 75, 10
    ),
    "resnet50": ModelCase(
      "resnet50", f"ResNet-50, {hw}x{hw}x3, batch {b}", 1000, (b, hw, hw, 3), 120, 8
    ),
    "vit_tiny": ModelCase(
      "vit_tiny",
      "ViT-Ti/4, CIFAR 32x32x3, batch 32",
      10,
      (32, 32, 32, 3),
      75,
      10,
      (("patch", 4),),
    ),
    "gpt_tiny": ModelCase(
      "gpt_tiny", "GPT 4-layer (width 128, vocab 256), batch 16 x 128", 256, (16, 128), 75, 10
    ),
    # Realistic sizes, for an accelerator (benchmarks/device_suite.py).
    "vit_ti16": ModelCase(
      "vit_tiny", "ViT-Ti/16, 224x224x3, batch 128", 1000, (128, 224, 224, 3), 60, 8
    ),
    "gpt2_small": ModelCase(
      "gpt2_small", "GPT-2 small (124M), batch 8 x 1024", 50257, (8, 1024), 60, 8
    ),
  }
  return [all_cases[m] for m in args.models.split(",")]


def make_step(model, tx):
  """A donated train step; ``batch_stats`` is an empty dict for models without batch norm."""

  def loss_fn(params, batch_stats, x, y):
    if batch_stats:
      logits, new = model.apply(
        {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
      )
      batch_stats = new["batch_stats"]
    else:
      logits = model.apply({"params": params}, x, train=True)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, batch_stats

  def step(params, batch_stats, opt_state, x, y):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch_stats, x, y
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


class Arm:
  """One optimizer's train loop: holds its own (donated) params, batch stats and state."""

  def __init__(self, model, tx, variables, x, y):
    self.params = jax.tree.map(jnp.copy, variables["params"])
    self.batch_stats = jax.tree.map(jnp.copy, variables.get("batch_stats", {}))
    self.opt_state = jax.jit(tx.init)(self.params)
    self.x, self.y = x, y
    t = time.perf_counter()
    self.step = (
      make_step(model, tx).lower(self.params, self.batch_stats, self.opt_state, x, y).compile()
    )
    self.compile_s = time.perf_counter() - t
    self.steps_taken = 0
    self.block_size = 1

  def run(self, n: int) -> float:
    """Runs ``n`` steps; returns seconds per step."""
    t = time.perf_counter()
    for _ in range(n):
      self.params, self.batch_stats, self.opt_state, loss = self.step(
        self.params, self.batch_stats, self.opt_state, self.x, self.y
      )
    C.block((self.params, self.opt_state, loss))
    self.steps_taken += n
    return (time.perf_counter() - t) / n

  def __call__(self) -> float:
    return self.run(self.block_size)


def bench_model(case: ModelCase, method_names: list[str], args) -> dict[str, Any]:
  print(f"\n{case.label}", flush=True)
  model = get_model(case.name, case.num_classes, dtype=args.dtype, **dict(case.overrides))
  kx, ky, kinit = jax.random.split(jax.random.key(0), 3)
  if case.tokens:  # next-token prediction on random tokens
    x = jax.random.randint(kx, case.input_shape, 0, case.num_classes)
    y = jnp.roll(x, -1, axis=1)
  else:
    x = jax.random.normal(kx, case.input_shape, jnp.float32)
    y = jax.random.randint(ky, (case.input_shape[0],), 0, case.num_classes)
  variables = jax.jit(lambda k: model.init(k, x, train=False))(kinit)
  leaves = jax.tree.leaves(variables["params"])
  n_params = sum(w.size for w in leaves)
  n_kernel = sum(w.size for w in leaves if w.ndim >= 2)

  base = C.base_optimizer()
  all_methods = C.methods()
  txs = {"base": base} | {
    m: autosparse.optax_chain(base, all_methods[m], case.prunable) for m in method_names
  }
  arms: dict[str, Arm] = {}
  for name, tx in txs.items():
    arms[name] = Arm(model, tx, variables, x, y)
    print(f"  compiled {name} in {arms[name].compile_s:.1f} s", flush=True)

  warmup = 1 if args.smoke else 2
  for arm in arms.values():
    arm.run(warmup)
  # Blocks of about --block-s seconds of base steps, the same number of steps for every arm.
  base_step = min(arms["base"].run(1) for _ in range(2 if args.smoke else 3))
  size = 1 if args.smoke else max(1, math.ceil(args.block_s / base_step))
  for arm in arms.values():
    arm.block_size = size
  print(f"  base step ~{base_step * 1e3:.1f} ms; blocks of {size} steps", flush=True)

  t = time.perf_counter()
  times = C.interleave(
    arms,
    min_rounds=case.min_rounds,
    max_rounds=case.min_rounds if args.smoke else 10_000,
    budget_s=case.budget_s * args.budget_scale,
    seed=args.seed,
    log=print if args.verbose else None,
  )
  timing_s = time.perf_counter() - t

  result = {
    "model": case.name,
    "label": case.label,
    "input_shape": list(case.input_shape),
    "dtype": args.dtype,
    "num_classes": case.num_classes,
    "params": int(n_params),
    "kernel_params": int(n_kernel),
    "block_steps": size,
    "timing_s": round(timing_s, 1),
    "arms": {},
  }
  for name, arm in arms.items():
    ts = times[name]
    entry = {
      "step_s": C.quartiles(ts),
      "mean_step_s": float(np.mean(ts)),
      "compile_s": round(arm.compile_s, 2),
      "steps_taken": arm.steps_taken,
      "times_s": [float(v) for v in ts],
    }
    if name != "base":  # ratio_to_base and extra_ms: restat()
      entry["sparsity_after"] = float(autosparse.sparsity(arm.params, case.prunable).total)
      passes = getattr(arm.opt_state.mask, "passes", None)
      if passes is not None:  # the top-k search of the last step
        entry["topk_passes_last_step"] = int(passes)
    result["arms"][name] = entry
  return result


def verdict(q: dict[str, float], goal: float = 1.05) -> str:
  """'yes' when the whole 95% interval is within the goal, 'no' when all of it is above."""
  if q["ci95_hi"] <= goal:
    return "yes"
  if q["ci95_lo"] > goal:
    return "no"
  return "not resolved"


def table(results: list[dict[str, Any]]) -> str:
  rows = []
  for r in results:
    base = r["arms"]["base"]["step_s"]
    for name, a in r["arms"].items():
      if name == "base":
        continue
      q = a["ratio_to_base"]
      rows.append(
        [
          r["label"],
          name,
          C.fmt_ms(base["median"]),
          C.fmt_ms(a["step_s"]["median"]),
          f"{a['extra_ms']:+.1f}",
          f"**{q['ratio']:.3f}**",
          f"[{q['ci95_lo']:.3f}, {q['ci95_hi']:.3f}]",
          f"{q['paired_q1']:.3f} – {q['paired_q3']:.3f}",
          verdict(q),
          f"{a['sparsity_after']:.2f}",
          a.get("topk_passes_last_step", "—"),
          q["rounds"],
        ]
      )
  return C.md_table(
    [
      "model, batch",
      "method",
      "base ms/step",
      "chain ms/step",
      "extra ms",
      "ratio",
      "95% CI",
      "per-round IQR",
      "within 5%",
      "sparsity",
      "top-k passes",
      "rounds",
    ],
    rows,
  )


def render(payload: dict[str, Any]) -> str:
  """The markdown report of a results payload."""
  methods = payload["methods"]
  md = [
    C.md_header("Train-step overhead: optax_chain(base, method) vs base", payload),
    "Per-step time of a full jitted train step (forward, backward, BN stats, update; buffers "
    "donated), arms interleaved. Ratio = median over rounds of chain/base within the round, "
    "95% CI by bootstrap over rounds, per-round IQR = quartiles of chain/base within a round; "
    "ms/step = medians over rounds; extra ms = (ratio - 1) x base ms/step. Sparsity = "
    "fraction of zero kernel weights in the params after the run. Within 5%: yes / no when "
    "the whole CI is below / above 1.05. Top-k passes: whole-kernel passes of the last "
    "step's top-k search (warm-started from the previous cut). Base: `add_decayed_weights(5e-5)` + "
    "`sgd(0.1, momentum=0.875)`.\n",
    table(payload["results"]),
    "",
    "Methods: " + "; ".join(f"{m}: {note}" for m, note in methods.items()) + ".",
  ]
  return "\n".join(md)


def restat(payload: dict[str, Any]) -> dict[str, Any]:
  """Recomputes every ratio from the raw per-round times in ``payload`` (in place)."""
  seed = payload.get("seed", 0)
  for r in payload["results"]:
    base = r["arms"]["base"]["times_s"]
    for name, a in r["arms"].items():
      if name != "base":
        q = a["ratio_to_base"] = C.ratio_stats(a["times_s"], base, seed=seed)
        # The chain's extra time per step, from the paired ratio and the base's median step.
        a["extra_ms"] = (q["ratio"] - 1.0) * float(np.median(base)) * 1e3
  return payload


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny models, 3 rounds: seconds (CI)")
  p.add_argument("--out", default="benchmarks/results/step_overhead.json")
  p.add_argument("--models", default="lenet_300_100,lenet5,resnet20,resnet50,vit_tiny,gpt_tiny")
  p.add_argument("--methods", default=",".join(C.methods()))
  p.add_argument("--resnet50-size", type=int, default=224, help="input height = width")
  p.add_argument("--resnet50-batch", type=int, default=2)
  p.add_argument(
    "--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype"
  )
  p.add_argument("--block-s", type=float, default=0.25, help="target seconds per block")
  p.add_argument("--budget-scale", type=float, default=1.0, help="scales each model's budget")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--verbose", action="store_true", help="print every round")
  p.add_argument("--render", action="store_true", help=C.RENDER_HELP)
  args = p.parse_args(argv)
  if args.render:
    return C.rerender(args.out, restat, render)

  head = C.header()
  method_names = args.methods.split(",")
  unknown = set(method_names) - set(C.methods())
  if unknown:
    p.error(f"unknown methods {sorted(unknown)}; known: {list(C.methods())}")
  results = [bench_model(case, method_names, args) for case in cases(args)]
  payload = C.finish(head) | {
    "benchmark": "step_overhead",
    "smoke": args.smoke,
    "seed": args.seed,
    "base_optimizer": "optax.chain(add_decayed_weights(5e-5), sgd(0.1, momentum=0.875))",
    "methods": {m: C.METHOD_NOTES[m] for m in method_names},
    "goal_ratio": 1.05,
    "results": results,
  }
  markdown = render(restat(payload))
  print()
  print(markdown)
  C.write_results(args.out, payload, markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main())
