"""Top-k mask selection on large kernels: ``topk.cutoffs`` + ``topk.mask`` (autosparse_jax's
counting bisection) vs ``jax.lax.top_k`` and vs a ``jnp.sort`` threshold.

For each case (one kernel of 1M, 4M or 16M float32 entries, one with many ties, and the list of
ResNet-50's 54 kernels) and each method, a jitted function maps the kernel(s) to boolean masks
keeping ``k = round(0.2 * size)`` entries per kernel (80% sparsity) of the largest ``|w|``:

* ``cutoffs+mask``: ``topk.cutoffs(ws, ks)`` (all kernels searched in one loop) and
  ``topk.mask``; ties broken by the lower flat index;
* ``lax.top_k``: ``jax.lax.top_k(|w|.ravel(), k)`` indices scattered into a mask (per kernel);
* ``sort threshold``: ``v = jnp.sort(|w|.ravel())[size - k]``, mask ``|w| >= v`` (per kernel)
  -- the usual sort-based selection; it keeps more than ``k`` when entries tie at ``v``.

Timing: the methods of a case run interleaved (random order per round), median per call.
Exactness: each mask is compared with a numpy oracle (a stable sort of ``-|w|`` in float64:
ties broken by the lower flat index), and its count with ``k``.

  python benchmarks/topk_search.py --out benchmarks/results/topk_search.json
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, NamedTuple

import _common as C
import jax
import jax.numpy as jnp
import numpy as np

from autosparse_jax import topk
from autosparse_jax.models import get_model

SPARSITY = 0.8


class Case(NamedTuple):
  name: str
  shapes: list[tuple[int, ...]]
  ties: bool  # values rounded to bfloat16 precision: many equal magnitudes
  budget_s: float
  min_rounds: int


def resnet50_kernel_shapes(smoke: bool) -> list[tuple[int, ...]]:
  if smoke:
    model, x = get_model("lenet_300_100", 10), jnp.zeros((1, 784))
  else:
    model, x = get_model("resnet50", 1000), jnp.zeros((1, 224, 224, 3))
  shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
  return [tuple(s.shape) for s in jax.tree.leaves(shapes["params"]) if s.ndim >= 2]


def cases(smoke: bool) -> list[Case]:
  if smoke:
    return [
      Case("4K (64x64)", [(64, 64)], False, 0, 2),
      Case("64K (256x256), ties", [(256, 256)], True, 0, 2),
      Case("LeNet-300-100 kernels (3)", resnet50_kernel_shapes(True), False, 0, 2),
    ]
  return [
    Case("1M (1024x1024)", [(1024, 1024)], False, 20, 5),
    Case("4M (2048x2048)", [(2048, 2048)], False, 30, 5),
    Case("4M (2048x2048), ties (bf16 values)", [(2048, 2048)], True, 30, 5),
    Case("16M (4096x4096)", [(4096, 4096)], False, 60, 3),
    Case("ResNet-50 kernels (54, 25.5M)", resnet50_kernel_shapes(False), False, 90, 3),
  ]


def by_cutoffs(ws, ks):
  return [topk.mask(w, c) for w, c in zip(ws, topk.cutoffs(ws, ks), strict=True)]


def by_top_k(ws, ks):
  out = []
  for w, k in zip(ws, ks, strict=True):
    _, idx = jax.lax.top_k(jnp.abs(w).ravel(), k)
    out.append(jnp.zeros(w.size, bool).at[idx].set(True).reshape(w.shape))
  return out


def by_sort(ws, ks):
  out = []
  for w, k in zip(ws, ks, strict=True):
    a = jnp.abs(w)
    if k == 0:
      out.append(jnp.zeros(w.shape, bool))
      continue
    v = jnp.sort(a.ravel())[w.size - k]
    out.append(a >= v)
  return out


METHODS = {"cutoffs+mask": by_cutoffs, "lax.top_k": by_top_k, "sort threshold": by_sort}


def oracle(w: np.ndarray, k: int) -> np.ndarray:
  """Top-k of |w|, ties broken by the lower flat index (a stable sort, float64)."""
  order = np.argsort(-np.abs(w.astype(np.float64)).ravel(), kind="stable")
  m = np.zeros(w.size, bool)
  m[order[:k]] = True
  return m.reshape(w.shape)


class Arm:
  def __init__(self, fn, ws, ks):
    self.args = ws
    t = time.perf_counter()
    self.fn = jax.jit(lambda ws: fn(ws, ks)).lower(ws).compile()
    self.compile_s = time.perf_counter() - t
    self.block_size = 1

  def run(self, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
      out = self.fn(self.args)
    C.block(out)
    return (time.perf_counter() - t) / n

  def __call__(self) -> float:
    return self.run(self.block_size)


def bench_case(case: Case, args) -> dict[str, Any]:
  print(f"\n{case.name}", flush=True)
  key = jax.random.key(args.seed)
  ws = []
  for i, shape in enumerate(case.shapes):
    w = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)
    if case.ties:
      w = w.astype(jnp.bfloat16).astype(jnp.float32)
    ws.append(w)
  ks = [int(topk.keep_count(int(np.prod(s)), SPARSITY)) for s in case.shapes]
  size = int(sum(np.prod(s) for s in case.shapes))

  arms = {name: Arm(fn, ws, ks) for name, fn in METHODS.items()}
  for name, arm in arms.items():
    print(f"  compiled {name} in {arm.compile_s:.1f} s", flush=True)

  # Exactness against the oracle (this first call is also the warm-up).
  host = [np.asarray(w) for w in ws]
  truth = [oracle(w, k) for w, k in zip(host, ks, strict=True)]
  exact = {}
  for name, arm in arms.items():
    masks = [np.asarray(m) for m in arm.fn(ws)]
    counts = [int(m.sum()) for m in masks]
    exact[name] = {
      "identical_to_oracle": all(np.array_equal(m, t) for m, t in zip(masks, truth, strict=True)),
      "count_equals_k": counts == ks,
      "max_count_minus_k": max(c - k for c, k in zip(counts, ks, strict=True)),
      "kernels_differing": sum(not np.array_equal(m, t) for m, t in zip(masks, truth, strict=True)),
    }
  # Ties at the cut (how many entries equal the k-th largest magnitude), the first kernel.
  a = np.abs(host[0]).ravel()
  kth = np.partition(a, a.size - ks[0])[a.size - ks[0]] if ks[0] else None
  tied_at_cut = int((a == kth).sum()) if kth is not None else 0

  times = C.interleave(
    arms,
    min_rounds=case.min_rounds,
    max_rounds=case.min_rounds if args.smoke else 1000,
    budget_s=case.budget_s * args.budget_scale,
    seed=args.seed,
    log=print if args.verbose else None,
  )
  ref = "cutoffs+mask"
  out = {
    "case": case.name,
    "shapes": [list(s) for s in case.shapes],
    "kernels": len(case.shapes),
    "elements": size,
    "k": ks if len(ks) <= 4 else sum(ks),
    "ties": case.ties,
    "tied_at_cut_first_kernel": tied_at_cut,
    "methods": {},
  }
  for name, arm in arms.items():
    out["methods"][name] = {
      "time_s": C.quartiles(times[name]),
      "times_s": [float(v) for v in times[name]],
      "compile_s": round(arm.compile_s, 2),
      "ratio_to_cutoffs": C.ratio_stats(times[name], times[ref], seed=args.seed),
      "elements_per_s": size / float(np.median(times[name])),
    } | exact[name]
  return out


def table(results: list[dict[str, Any]]) -> str:
  rows = []
  for r in results:
    for name, m in r["methods"].items():
      q = m["ratio_to_cutoffs"]
      rows.append(
        [
          r["case"],
          name,
          C.fmt_ms(m["time_s"]["median"]),
          "1"
          if name == "cutoffs+mask"
          else f"{q['ratio']:.2f} [{q['ci95_lo']:.2f}, {q['ci95_hi']:.2f}]",
          f"{m['elements_per_s'] / 1e6:.0f}",
          "yes" if m["identical_to_oracle"] else f"no ({m['kernels_differing']} kernels)",
          "yes" if m["count_equals_k"] else f"no (+{m['max_count_minus_k']})",
          r["tied_at_cut_first_kernel"],
          q["rounds"],
        ]
      )
  return C.md_table(
    [
      "case",
      "method",
      "ms (median)",
      "time / cutoffs+mask [95% CI]",
      "M elements/s",
      "mask == oracle",
      "count == k",
      "entries tied at the cut",
      "rounds",
    ],
    rows,
  )


def render(payload: dict[str, Any]) -> str:
  """The markdown report of a results payload."""
  return "\n".join(
    [
      C.md_header("Top-k mask selection: topk.cutoffs + mask vs lax.top_k vs sort", payload),
      f"Masks keeping k = round({1 - payload['sparsity']:.1f} * size) of the largest |w| per "
      "kernel (float32, standard normal; 'ties': values rounded to bfloat16). Median time per "
      "jitted call over rounds, methods interleaved; ratio = median over rounds of "
      "method / cutoffs+mask within the round, with a 95% bootstrap CI. Exactness against a "
      "numpy stable-sort oracle (ties to the lower flat index).\n",
      table(payload["results"]),
    ]
  )


def restat(payload: dict[str, Any]) -> dict[str, Any]:
  """Recomputes every ratio from the raw per-round times in ``payload`` (in place)."""
  seed = payload.get("seed", 0)
  for r in payload["results"]:
    ref = r["methods"]["cutoffs+mask"]["times_s"]
    for m in r["methods"].values():
      m["ratio_to_cutoffs"] = C.ratio_stats(m["times_s"], ref, seed=seed)
  return payload


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny kernels, 2 rounds")
  ap.add_argument("--out", default="benchmarks/results/topk_search.json")
  ap.add_argument("--budget-scale", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--verbose", action="store_true")
  ap.add_argument("--render", action="store_true", help=C.RENDER_HELP)
  args = ap.parse_args(argv)
  if args.render:
    return C.rerender(args.out, restat, render)

  head = C.header()
  results = [bench_case(case, args) for case in cases(args.smoke)]
  payload = C.finish(head) | {
    "benchmark": "topk_search",
    "smoke": args.smoke,
    "seed": args.seed,
    "sparsity": SPARSITY,
    "results": results,
  }
  md = render(payload)
  print()
  print(md)
  C.write_results(args.out, payload, md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
