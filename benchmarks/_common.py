"""Shared helpers for the benchmark scripts: machine facts, interleaved timing, statistics and
the JSON + markdown results files.

Timings on a shared machine drift (other jobs, frequency scaling, cache state), so every
benchmark here runs its candidates *interleaved*: one round runs each arm once (a block of
steps), in a fresh random order per round, and ratios are taken between arms of the same
round. A slow period then slows every arm of that round alike instead of biasing one of them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def memory_total_gib() -> float | None:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2**20, 1)
  except OSError:
    pass
  return None


def machine() -> dict[str, Any]:
  """What the numbers were measured on."""
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  return {
    "cpu": cpu_model(),
    "cores": os.cpu_count(),
    "cores_usable": usable,
    "memory_gib": memory_total_gib(),
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "platform": platform.platform(),
  }


def _jaxlib_version() -> str | None:
  try:
    import jaxlib

    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def load_average() -> list[float] | None:
  """1, 5 and 15 minute load averages: how busy the (shared) machine was."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


#: The modules an optimizer update runs (what the speed benchmarks measure).
OPTIMIZER_MODULES = (
  "chain",
  "controller",
  "methods",
  "schedules",
  "selection",
  "stages",
  "topk",
)


def library() -> dict[str, Any]:
  """Which autosparse_jax was measured: its version and hashes of its sources, since results
  files are committed apart from the code they measured. ``optimizer_sources_sha256`` covers
  only the modules the optimizer runs (``OPTIMIZER_MODULES``), ``sources_sha256`` every
  top-level module."""
  import autosparse_jax

  root = Path(autosparse_jax.__file__).resolve().parent

  def digest(files):
    h = hashlib.sha256()
    for f in files:
      h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]

  optimizer = [root / f"{m}.py" for m in OPTIMIZER_MODULES if (root / f"{m}.py").exists()]
  return {
    "version": autosparse_jax.__version__,
    "optimizer_sources_sha256": digest(optimizer),
    "sources_sha256": digest(sorted(root.glob("*.py"))),
  }


def header(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command, date, machine and library: the common part of every results file."""
  argv = sys.argv if argv is None else argv
  return {
    "command": " ".join(["python", *argv]),
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "machine": machine(),
    "autosparse_jax": library(),
    "load_average_start": load_average(),
  }


def finish(head: dict[str, Any]) -> dict[str, Any]:
  """``head`` with the load average at the end."""
  return head | {"load_average_end": load_average()}


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def interleave(
  arms: dict[str, Callable[[], float]],
  *,
  min_rounds: int,
  max_rounds: int,
  budget_s: float,
  seed: int = 0,
  log: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
  """Runs every arm once per round, in a random order each round, for at least ``min_rounds``
  and until ``budget_s`` seconds have passed (at most ``max_rounds``).

  Each arm is a callable that runs one block and returns its time per step (seconds).
  Returns ``{arm: [time per step of round r, ...]}``, all lists of the same length.
  """
  rng = np.random.default_rng(seed)
  names = list(arms)
  times: dict[str, list[float]] = {n: [] for n in names}
  start = time.perf_counter()
  for r in range(max_rounds):
    if r >= min_rounds and time.perf_counter() - start > budget_s:
      break
    for i in rng.permutation(len(names)):
      times[names[i]].append(arms[names[i]]())
    if log is not None:
      log(f"  round {r + 1}: " + ", ".join(f"{n} {times[n][-1] * 1e3:.2f} ms" for n in names))
  return times


def quartiles(x: Sequence[float]) -> dict[str, float]:
  q1, q2, q3 = np.percentile(np.asarray(x, np.float64), [25, 50, 75])
  return {"median": float(q2), "q1": float(q1), "q3": float(q3)}


def ratio_stats(
  arm: Sequence[float], base: Sequence[float], *, n_boot: int = 2000, seed: int = 0
) -> dict[str, float]:
  """The ratio of ``arm`` to ``base``: the median over rounds of the per-round ratios
  ``arm_r / base_r`` (each pair ran in the same round, so a slow period scales both), with a
  95% bootstrap interval of that median (rounds resampled) and the quartiles of the per-round
  ratios. ``ratio_of_medians`` (``median(arm) / median(base)``) is kept for reference; under
  drifting load it is the noisier of the two."""
  a, b = np.asarray(arm, np.float64), np.asarray(base, np.float64)
  paired = a / b
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(a), size=(n_boot, len(a)))
  boot = np.median(paired[idx], axis=1)
  lo, hi = np.percentile(boot, [2.5, 97.5])
  q1, q2, q3 = np.percentile(paired, [25, 50, 75])
  return {
    "ratio": float(q2),
    "ci95_lo": float(lo),
    "ci95_hi": float(hi),
    "paired_q1": float(q1),
    "paired_q3": float(q3),
    "ratio_of_medians": float(np.median(a) / np.median(b)),
    "rounds": len(a),
  }


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; also what the scripts print."""

  def cell(v: Any) -> str:
    return v if isinstance(v, str) else f"{v}"

  lines = [
    "| " + " | ".join(headers) + " |",
    "|" + "|".join("---" for _ in headers) + "|",
  ]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def md_header(title: str, head: dict[str, Any]) -> str:
  m, lib = head["machine"], head["autosparse_jax"]
  return (
    f"## {title}\n\n"
    f"`{head['command']}`\n\n"
    f"{head['date']} · {m['cpu']} · {m['cores_usable']} of {m['cores']} cores usable · "
    f"{m['memory_gib']} GiB · jax {m['jax']} ({m['backend']}) · autosparse_jax "
    f"{lib['version']} (optimizer sources {lib.get('optimizer_sources_sha256', '?')}) · "
    "load average "
    f"{_load(head.get('load_average_start'))} at start, {_load(head.get('load_average_end'))} "
    "at end\n"
  )


def _load(v: list[float] | None) -> str:
  return "?" if v is None else "/".join(f"{x:g}" for x in v)


def write_results(out: str | os.PathLike, payload: dict[str, Any], markdown: str) -> None:
  """Writes ``out`` (JSON) and the markdown beside it (same name, ``.md``)."""
  path = Path(out)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
  path.with_suffix(".md").write_text(markdown.rstrip() + "\n")
  print(f"wrote {path} and {path.with_suffix('.md')}")


RENDER_HELP = (
  "measure nothing: recompute the statistics from the raw timings in --out and rewrite it and "
  "its markdown"
)


def rerender(
  out: str | os.PathLike,
  restat: Callable[[dict[str, Any]], dict[str, Any]],
  render: Callable[[dict[str, Any]], str],
) -> int:
  """``--render``: rewrites a results file and its markdown from its own raw timings."""
  payload = restat(json.loads(Path(out).read_text()))
  markdown = render(payload)
  print(markdown)
  write_results(out, payload, markdown)
  return 0


def fmt_ms(seconds: float) -> str:
  ms = seconds * 1e3
  return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(r: dict[str, float]) -> str:
  return f"{r['ratio']:.3f} [{r['ci95_lo']:.3f}, {r['ci95_hi']:.3f}]"


# The optimizers compared. The base is the paper's ResNet recipe: SGD with momentum 0.875 and
# weight decay applied to the gradient outside the loss (decoupled from the loss, as in the
# README's quick start).
LEARNING_RATE = 0.1
MOMENTUM = 0.875
WEIGHT_DECAY = 5e-5
SCHEDULE_STEPS = 10_000  # T of the alpha schedules and the pruning window; only sets alpha_t


def base_optimizer():
  import optax

  return optax.chain(
    optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  )


def methods() -> dict[str, Any]:
  """The sparse methods benchmarked, by display name."""
  import autosparse_jax as autosparse

  alpha = autosparse.sigmoid_cosine_decay(alpha0=0.5, decay_steps=SCHEDULE_STEPS)
  return {
    "AutoSparse": autosparse.AutoSparse(alpha=alpha, threshold_init=-5.0, granularity="layer"),
    "TopKAST": autosparse.TopKAST(forward_sparsity=0.8),
    "TopKAST+GA": autosparse.TopKAST(forward_sparsity=0.8, backward_sparsity=0.5, alpha=alpha),
    "GradualMagnitude": autosparse.GradualMagnitude(
      target_sparsity=0.8, begin_step=0, end_step=SCHEDULE_STEPS, frequency=100
    ),
    "RigL": autosparse.RigL(0.8, end_step=SCHEDULE_STEPS * 3 // 4, update_every=100),
    "RigL+GA": autosparse.RigL(
      0.8, end_step=SCHEDULE_STEPS * 3 // 4, update_every=100, alpha=alpha
    ),
  }


METHOD_NOTES = {
  "AutoSparse": "alpha = sigmoid_cosine_decay(0.5, T=10k), threshold_init -5, per layer, "
  "other fields default (max_layer_sparsity 0.999)",
  "TopKAST": "forward = backward sparsity 0.8 (B = A)",
  "TopKAST+GA": "forward 0.8, backward 0.5, alpha = sigmoid_cosine_decay(0.5, T=10k)",
  "GradualMagnitude": "target 0.8, steps 0..10k, masks recomputed every 100 steps",
  "RigL": "sparsity 0.8, uniform, rewired every 100 steps until 7.5k (drop 0.3, cosine)",
  "RigL+GA": "RigL, inactive weights trained at alpha = sigmoid_cosine_decay(0.5, T=10k)",
}
