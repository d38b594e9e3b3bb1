"""The optimizer update alone on ResNet-50's parameter tree: chain vs base.

Arms (interleaved rounds, median time per call):

* ``base``: ``params, state = apply_updates(params, base.update(g, state, params))``;
* each method: the same with ``autosparse.optax_chain(base, method)``;
* ``search``: ``topk.cutoffs`` over every ResNet-50 kernel at 80% sparsity, the top-k search
  alone (TopKAST runs one per update, TopKAST+GA one joint search over its two budgets);
* ``copy``: the machine's memory bandwidth, measured in the same rounds: ``x <- x + 1.0``
  (donated: read + write) over a 512 MB float32 array;
* ``sum`` and ``count``: two reductions of the same array, ``jnp.sum(x)`` and
  ``counting.count_above(x, c)`` over rows of 1024 (the exact count of every top-k search pass
  and of the sparsity ceiling), which show how fast XLA reduces on this backend.

Params and state are donated, as in a train step. The parameter tree is the real ResNet-50
(``jax.eval_shape(model.init, ...)``: 25,557,032 float32 params, 54 kernels with 25,502,912
weights) filled with random values.

Bytes moved per update are counted from a model of the minimum traffic of each update as the
code computes it (each array read or written once per pass; see ``traffic``), and set against
the measured bandwidth: ``bound`` is the time the update would take moving those bytes at the
measured copy bandwidth, ``bound / measured`` how close the update runs to the memory limit.
XLA's own ``bytes accessed`` estimate is recorded in the JSON too (it counts a loop body once,
not 31 times).

State memory: bytes of the optimizer state pytree from ``jax.eval_shape(tx.init, params)``,
and the update's peak (arguments + outputs - donated aliases + temporaries) from XLA's
``memory_analysis`` of the compiled update.

  python benchmarks/optimizer_update.py --out benchmarks/results/optimizer_update.json
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from typing import Any

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax

import autosparse_jax as autosparse
from autosparse_jax import counting, topk
from autosparse_jax.models import TRANSFORMER_PRUNABLE, get_model
from autosparse_jax.selection import select_leaves

SPARSITY = 0.8
# name -> (registry name, model overrides, init input, prunable rules)
TREES = {
  "resnet50": ("resnet50", {}, (1, 224, 224, 3), None),
  "vit_tiny": ("vit_tiny", {}, (1, 224, 224, 3), TRANSFORMER_PRUNABLE),
  "gpt2_small": ("gpt2_small", {}, (1, 8), TRANSFORMER_PRUNABLE),
}
NO_CEILING = "AutoSparse, no ceiling"


def param_shapes(tree: str, smoke: bool):
  """The param tree's shapes and its prunable rules."""
  if smoke:
    name, overrides, shape, prunable = "lenet_300_100", {}, (1, 784), None  # fast to compile
  else:
    name, overrides, shape, prunable = TREES[tree]
  model = get_model(name, 1000 if name != "gpt2_small" else 50257, **overrides)
  dtype = jnp.int32 if name.startswith("gpt") else jnp.float32
  x = jnp.zeros(shape, dtype)
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
  return shapes["params"], prunable


def random_tree(shapes, key, scale):
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  make = jax.jit(
    lambda ks: [
      scale * jax.random.normal(k, s.shape, s.dtype) for k, s in zip(ks, leaves, strict=True)
    ]
  )
  return treedef.unflatten(make(keys))


def nbytes(tree) -> int:
  return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def traffic(name: str, n: int, p: int, passes: float = 0.0) -> dict[str, float]:
  """Bytes an update moves, by a pass model (float32: 4 bytes per element; masks 1 byte).

  ``n``: all params; ``p``: pruned kernel weights. ``stream``: elementwise passes; ``search``:
  top-k search passes (one read of the kernels' bit patterns and a count each). Every array
  is counted once per pass that must touch it:

  * base (decayed weights + momentum SGD + apply_updates, one fused pass): read g, p, mu;
    write mu, p: 5 arrays.
  * AutoSparse: dL/ds needs a layer-wide sum of g * sign(W) * M before s, and so tau_new and
    W_eff_new, are known: a reduction pass reading g, W (kernels; the sparsity ceiling's count
    of M can share it); then the update pass reads g, W, mu, p and writes W, mu, p
    (updates = W_eff_new - p, then p + updates): 7 arrays.
  * TopKAST: the same 7 arrays (``update`` rebuilds the masks of the old latent W from the
    cut-offs cached in the state, in the pass that reads W anyway), plus one top-k search of
    ``passes`` passes (measured: the state's ``passes`` after the timed updates) over the
    kernels' 4-byte bit patterns on the new W in ``sparsify``. With backward != forward
    sparsity (TopKAST+GA here) one search serves both budgets: each pass reads a kernel once.
  * GradualMagnitude between pruning steps: the 7 arrays plus the boolean mask read and
    written (it is carried through a ``lax.cond``); one search every ``frequency`` steps.
  * RigL, RigL+GA between rewiring steps: the same as GradualMagnitude (the drop-and-grow
    searches and the reset of grown weights run every ``update_every`` steps, not counted).
  """
  f32 = 4
  searches = {"TopKAST": 1, "TopKAST+GA": 1}.get(name, 0)
  if name == "base":
    stream = 5 * f32 * n
  elif name.startswith("AutoSparse"):
    stream = 7 * f32 * n + 2 * f32 * p
  elif name in ("GradualMagnitude", "RigL", "RigL+GA"):
    stream = 7 * f32 * n + 2 * p
  elif name in ("TopKAST", "TopKAST+GA"):
    stream = 7 * f32 * n
  elif name == "search":
    stream, searches = 0, 1
  else:
    raise ValueError(name)
  return {
    "stream_bytes": float(stream),
    "search_bytes": float(searches * passes * f32 * p),
    "searches": searches,
    "search_passes": float(passes),
  }


class UpdateArm:
  """``(params, state) <- apply_updates(params, tx.update(grads, state, params))``, donated."""

  def __init__(self, tx, params, grads):
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.jit(tx.init)(self.params)
    self.grads = grads

    def update(params, state, grads):
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state

    t = time.perf_counter()
    lowered = jax.jit(update, donate_argnums=(0, 1)).lower(self.params, self.state, grads)
    self.fn = lowered.compile()
    self.compile_s = time.perf_counter() - t
    self.xla_bytes = _xla_bytes(self.fn)
    self.copies, self.copy_bytes = _array_copies(self.fn)
    mem = self.fn.memory_analysis()
    self.temp_bytes = int(mem.temp_size_in_bytes)
    self.peak_bytes = int(
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      - mem.alias_size_in_bytes
      + mem.temp_size_in_bytes
    )
    self.block_size = 1

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      self.params, self.state = self.fn(self.params, self.state, self.grads)
    C.block((self.params, self.state))
    return (time.perf_counter() - t) / n

  def __call__(self) -> float:
    return self.run(self.block_size)


class FnArm:
  """A jitted function of fixed inputs (no donation); result discarded."""

  def __init__(self, fn, *args):
    t = time.perf_counter()
    self.fn = jax.jit(fn).lower(*args).compile()
    self.compile_s = time.perf_counter() - t
    self.args = args
    self.xla_bytes = _xla_bytes(self.fn)
    self.block_size = 1

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      out = self.fn(*self.args)
    C.block(out)
    return (time.perf_counter() - t) / n

  def __call__(self) -> float:
    return self.run(self.block_size)


class CopyArm(FnArm):
  """``x <- x + 1.0`` in place (donated): reads and writes every byte of ``x``."""

  def __init__(self, x):
    t = time.perf_counter()
    self.fn = jax.jit(lambda x: x + 1.0, donate_argnums=0).lower(x).compile()
    self.compile_s = time.perf_counter() - t
    self.x = x
    self.xla_bytes = _xla_bytes(self.fn)
    self.block_size = 1

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      self.x = self.fn(self.x)
    C.block(self.x)
    return (time.perf_counter() - t) / n


_COPY = re.compile(r"= (\w+)\[(\d+(?:,\d+)+)\]\S* copy\(")
_ITEMSIZE = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}


def _array_copies(compiled) -> tuple[int, int]:
  """Copies of whole (ndim >= 2) arrays in the compiled program's entry computation: XLA's
  copy insertion adds them when it cannot update a donated buffer in place."""
  try:
    text = compiled.as_text()
  except Exception:  # noqa: BLE001
    return 0, 0
  n = nbytes_ = 0
  for dtype, dims in _COPY.findall(text[text.find("ENTRY") :]):
    n += 1
    nbytes_ += int(np.prod([int(d) for d in dims.split(",")])) * _ITEMSIZE.get(dtype, 4)
  return n, nbytes_


def _xla_bytes(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0]
    return float(cost["bytes accessed"])
  except Exception:  # noqa: BLE001 -- an estimate that some backends do not give
    return None


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--smoke", action="store_true", help="LeNet-300-100 tree, 8 MB buffer, 2 rounds")
  ap.add_argument("--tree", default="resnet50", choices=sorted(TREES), help="the param tree")
  ap.add_argument("--out", default="benchmarks/results/optimizer_update.json")
  ap.add_argument("--methods", default=",".join(C.methods()))
  ap.add_argument("--bandwidth-mb", type=int, default=512, help="size of the bandwidth buffer")
  ap.add_argument("--budget-s", type=float, default=150.0, help="interleaved timing budget")
  ap.add_argument("--min-rounds", type=int, default=10)
  ap.add_argument("--block-s", type=float, default=0.2, help="target seconds per block")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--verbose", action="store_true")
  ap.add_argument("--render", action="store_true", help=C.RENDER_HELP)
  args = ap.parse_args(argv)
  if args.render:
    return C.rerender(args.out, restat, render)
  if args.smoke:
    args.bandwidth_mb, args.budget_s, args.min_rounds = 8, 0.0, 2

  head = C.header()
  method_names = args.methods.split(",")
  shapes, prunable = param_shapes(args.tree, args.smoke)
  kp, kg, kx = jax.random.split(jax.random.key(args.seed), 3)
  params = random_tree(shapes, kp, 0.05)
  grads = random_tree(shapes, kg, 1e-3)
  leaves = jax.tree.leaves(params)
  n = sum(w.size for w in leaves)
  kernels = [w for w, f in zip(leaves, select_leaves(params, prunable), strict=True) if f]
  p = sum(w.size for w in kernels)
  print(f"param tree: {n:,} params, {len(kernels)} kernels with {p:,} weights", flush=True)

  base = C.base_optimizer()
  all_methods = C.methods()
  txs = {"base": base} | {
    m: autosparse.optax_chain(base, all_methods[m], prunable) for m in method_names
  }
  if "AutoSparse" in method_names and getattr(
    all_methods["AutoSparse"], "max_layer_sparsity", None
  ):
    # The per-layer sparsity ceiling counts every layer's mask each step: its cost, apart.
    txs[NO_CEILING] = autosparse.optax_chain(
      base, dataclasses.replace(all_methods["AutoSparse"], max_layer_sparsity=None), prunable
    )
  arms: dict[str, Any] = {}
  state_bytes = {}
  for name, tx in txs.items():
    state_bytes[name] = nbytes(jax.eval_shape(tx.init, shapes))
    arms[name] = UpdateArm(tx, params, grads)
    print(f"  compiled {name} in {arms[name].compile_s:.1f} s", flush=True)
  counts = [topk.keep_count(w.size, SPARSITY) for w in kernels]
  arms["search"] = FnArm(lambda ws: topk.cutoffs(ws, counts), kernels)  # cold: no start
  cold_passes = int(jax.jit(lambda ws: topk.search(ws, counts).passes)(kernels))
  elems = args.bandwidth_mb * 2**20 // 4
  buf = jax.random.normal(kx, (elems,), jnp.float32)
  arms["copy"] = CopyArm(jnp.copy(buf))
  arms["sum"] = FnArm(jnp.sum, buf)
  # Rows made outside: a reshape inside the jit slows XLA:CPU's fused reduction 5x.
  arms["count"] = FnArm(lambda x: counting.count_above(x, 0.5), buf.reshape(-1, 1024))

  for arm in arms.values():  # warm-up, then blocks of about --block-s seconds per arm
    arm.run(1)
  for name, arm in arms.items():
    t = min(arm.run(1) for _ in range(2))
    arm.block_size = 1 if args.smoke else max(1, math.ceil(args.block_s / t))
    print(f"  {name}: ~{t * 1e3:.1f} ms per call; blocks of {arm.block_size}", flush=True)

  times = C.interleave(
    arms,
    min_rounds=args.min_rounds,
    max_rounds=args.min_rounds if args.smoke else 10_000,
    budget_s=args.budget_s,
    seed=args.seed,
    log=print if args.verbose else None,
  )

  head = C.finish(head)
  bytes_buf = elems * 4
  copy_bw = 2 * bytes_buf / np.asarray(times["copy"])  # per round
  count_bw = bytes_buf / np.asarray(times["count"])
  sum_bw = bytes_buf / np.asarray(times["sum"])
  bandwidth = {
    "buffer_bytes": bytes_buf,
    "copy_GBps": C.quartiles(copy_bw / 1e9),
    "count_GBps": C.quartiles(count_bw / 1e9),
    "sum_GBps": C.quartiles(sum_bw / 1e9),
    "sum_s": C.quartiles(times["sum"]),
    "copy_s": C.quartiles(times["copy"]),
    "count_s": C.quartiles(times["count"]),
    "times_s": {k: [float(v) for v in times[k]] for k in ("copy", "sum", "count")},
  }
  cbw = np.median(copy_bw)

  results = {}
  base_state = state_bytes["base"]
  for name in [*txs, "search"]:
    arm, ts = arms[name], times[name]
    passes = getattr(getattr(arm, "state", None), "mask", None)
    passes = cold_passes if name == "search" else int(getattr(passes, "passes", 0))
    model = traffic(name, n, p, passes)
    total = model["stream_bytes"] + model["search_bytes"]
    med = float(np.median(ts))
    bound = total / cbw
    entry = {
      "time_s": C.quartiles(ts),
      "times_s": [float(v) for v in ts],
      "compile_s": round(arm.compile_s, 2),
      "ratio_to_base": C.ratio_stats(ts, times["base"], seed=args.seed),
      "bytes_model": model | {"total_bytes": total},
      "bytes_vs_base": total / traffic("base", n, p)["stream_bytes"],
      "effective_GBps": total / med / 1e9,
      "bound_s": bound,
      "bound_over_measured": bound / med,
      "xla_bytes_accessed": arm.xla_bytes,
    }
    if name != "search":
      entry |= {
        "state_bytes": state_bytes[name],
        "state_bytes_per_param": state_bytes[name] / n,
        "state_vs_base": state_bytes[name] / base_state,
        "params_plus_state_vs_base": (4 * n + state_bytes[name]) / (4 * n + base_state),
        "update_temp_bytes": arm.temp_bytes,
        "update_peak_bytes": arm.peak_bytes,
        "xla_array_copies": arm.copies,
        "xla_array_copy_bytes": arm.copy_bytes,
      }
    results[name] = entry

  tree = "LeNet-300-100 (smoke)" if args.smoke else args.tree
  payload = head | {
    "benchmark": "optimizer_update",
    "smoke": args.smoke,
    "seed": args.seed,
    "tree": tree,
    "params": int(n),
    "kernels": len(kernels),
    "kernel_params": int(p),
    "sparsity": SPARSITY,
    "methods": {m: C.METHOD_NOTES[m] for m in method_names},
    "bandwidth": bandwidth,
    "results": results,
  }
  md = render(payload)
  print()
  print(md)
  C.write_results(args.out, payload, md)
  return 0


def _mb(b: float) -> str:
  return f"{b / 1e6:,.0f}" if b >= 1e8 else f"{b / 1e6:.3g}"


def render(payload: dict[str, Any]) -> str:
  """The markdown report of a results payload."""
  results, bw = payload["results"], payload["bandwidth"]
  rows = []
  for name, e in results.items():
    q = e["ratio_to_base"]
    own = name != "search"  # update arms have state and memory figures
    rows.append(
      [
        name,
        C.fmt_ms(e["time_s"]["median"]),
        "1" if name == "base" else f"**{q['ratio']:.2f}** [{q['ci95_lo']:.2f}, {q['ci95_hi']:.2f}]",
        f"{e['bytes_model']['search_passes']:.0f}" if e["bytes_model"]["searches"] else "—",
        _mb(e["bytes_model"]["total_bytes"]),
        f"{e['bytes_vs_base']:.1f}",
        f"{e['effective_GBps']:.1f}",
        C.fmt_ms(e["bound_s"]),
        f"{e['bound_over_measured']:.0%}",
        f"{_mb(e['state_bytes'])} ({e['state_vs_base']:.2f}x)" if own else "—",
        f"{e['state_bytes_per_param']:.1f}" if own else "—",
        f"{e['params_plus_state_vs_base']:.2f}" if own else "—",
        _mb(e["update_peak_bytes"]) if own else "—",
        f"{e['xla_array_copies']} ({_mb(e['xla_array_copy_bytes'])})" if own else "—",
      ]
    )
  return "\n".join(
    [
      C.md_header(f"Optimizer update alone: {payload['tree']} parameter tree", payload),
      f"{payload['params']:,} float32 params; {payload['kernels']} kernels, "
      f"{payload['kernel_params']:,} weights pruned. Measured bandwidth "
      f"({bw['buffer_bytes'] / 2**20:.0f} MB buffer, median over rounds): "
      f"copy `x + 1.0` **{bw['copy_GBps']['median']:.1f} GB/s** (read + write), "
      f"reductions (read only): `sum(x)` {bw['sum_GBps']['median']:.1f} GB/s, "
      f"`counting.count_above(x, c)` {bw['count_GBps']['median']:.2f} GB/s. "
      f"{results['base']['ratio_to_base']['rounds']} interleaved rounds; ms/update = median "
      "over rounds; ratio = median over rounds of arm / base within the round, with a 95% "
      "bootstrap CI.\n",
      C.md_table(
        [
          "arm",
          "ms/update",
          "ratio to base [95% CI]",
          "top-k passes",
          "MB moved (model)",
          "x base bytes",
          "effective GB/s",
          "bound ms",
          "bound / measured",
          "state MB (x base)",
          "state B/param",
          "params+state x base",
          "update peak MB",
          "XLA array copies (MB)",
        ],
        rows,
      ),
      "",
      f"`{NO_CEILING}`: AutoSparse with `max_layer_sparsity=None` (no per-layer count of the "
      "mask for the sparsity ceiling). "
      "`search` = one cold `topk.cutoffs` over all kernels (80% sparsity); the TopKAST arms' "
      "searches start from the previous step's cut. Top-k passes: whole-kernel passes of the "
      "last search. MB moved: the pass model "
      "in `optimizer_update.traffic` (minimum traffic of the update as computed). Bound = MB "
      "moved / copy bandwidth; bound / measured near 100% means the update runs at the memory "
      "limit. Update peak = XLA's arguments + outputs - donated aliases + temporaries of the "
      "compiled update. XLA array copies: whole-array `copy` ops in the compiled update (each "
      "moves its MB twice: read and write), inserted where a donated buffer cannot be updated "
      "in place.",
    ]
  )


def restat(payload: dict[str, Any]) -> dict[str, Any]:
  """Recomputes every ratio from the raw per-round times in ``payload``, and the bytes model
  with its bounds (in place)."""
  results, n, p = payload["results"], payload["params"], payload["kernel_params"]
  base = results["base"]["times_s"]
  base_bytes = traffic("base", n, p)["stream_bytes"]
  copy_bw = payload["bandwidth"]["copy_GBps"]["median"] * 1e9
  for name, e in results.items():
    e["ratio_to_base"] = C.ratio_stats(e["times_s"], base, seed=payload.get("seed", 0))
    model = traffic(name, n, p, e["bytes_model"].get("search_passes", 0.0))
    total = model["stream_bytes"] + model["search_bytes"]
    med = float(np.median(e["times_s"]))
    e |= {
      "bytes_model": model | {"total_bytes": total},
      "bytes_vs_base": total / base_bytes,
      "effective_GBps": total / med / 1e9,
      "bound_s": total / copy_bw,
      "bound_over_measured": total / copy_bw / med,
    }
  return payload


if __name__ == "__main__":
  sys.exit(main())
