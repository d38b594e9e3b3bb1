"""The accelerator suite: every speed and accuracy benchmark at device sizes, in one command.

Meant for a machine with one GPU (or TPU) and under 8 minutes; each part is a subprocess
running one of the sibling benchmark scripts with its own results file in ``--out-dir``:

1. ``step_overhead_resnet50``: full train step of every method vs dense, ResNet-50, batch 256,
   bfloat16 compute, synthetic data;
2. ``step_overhead_transformers``: the same for ViT-Ti/16 (224x224, batch 128) and GPT-2 small
   (batch 8 x 1024), bfloat16;
3. ``optimizer_update``: the update alone on ResNet-50's tree against the device's measured
   memory bandwidth (bytes model, bound, state bytes/param, compiled peak, top-k passes);
4. ``mnist_lenet5``: the LeNet-5 MNIST sweep, 20 epochs, dense / GMP / STR / AutoSparse /
   TopKAST / TopKAST+GA at 90/95/98%, when ``--mnist`` (default: the shared data dir) exists.
   The sweep appends finished runs to a ``.runs.jsonl`` file, so a part cut short by its time
   limit resumes where it stopped on the next call.

Every part has a time limit (``PARTS``: seconds, scaled by ``--time-scale``); a part that
exceeds it is stopped and recorded as such. ``device_suite.json`` in ``--out-dir`` lists the
parts, their commands, return codes, seconds and result files. ``--smoke`` runs each script once
in its own smoke mode (tiny models, CPU, seconds), for the tests.

  python benchmarks/device_suite.py --out-dir benchmarks/results/device
  python benchmarks/device_suite.py --smoke --out-dir /tmp/device_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

HERE = Path(__file__).resolve().parent
DEFAULT_MNIST = HERE.parents[1] / "shared" / "data" / "mnist.npz"

# name -> (script, arguments, time limit in seconds); the limits add up to under 8 minutes.
PARTS = {
  "step_overhead_resnet50": (
    "step_overhead.py",
    ["--models", "resnet50", "--resnet50-batch", "256", "--dtype", "bfloat16"]
    + ["--budget-scale", "0.25"],
    150,
  ),
  "step_overhead_transformers": (
    "step_overhead.py",
    ["--models", "vit_ti16,gpt2_small", "--dtype", "bfloat16", "--budget-scale", "0.25"],
    130,
  ),
  "optimizer_update": ("optimizer_update.py", ["--budget-s", "20", "--min-rounds", "5"], 60),
  "mnist_lenet5": (
    "mnist_sparsity_accuracy.py",
    ["--models", "lenet5", "--seeds", "0", "--epochs", "20", "--sparsities", "0.9", "0.95"]
    + ["0.98", "--methods", "gmp", "str", "autosparse", "topkast", "topkast_ga"],
    120,
  ),
}


def run_part(name: str, args, out_dir: Path) -> dict:
  script, extra, limit = PARTS[name]
  out = out_dir / f"{name}.json"
  cmd = [sys.executable, str(HERE / script), *extra, "--out", str(out)]
  if name == "mnist_lenet5":
    cmd += ["--mnist", str(args.mnist)]
  if args.smoke:
    cmd.append("--smoke")
  limit = limit * args.time_scale
  entry = {"command": " ".join(Path(c).name if c == sys.executable else c for c in cmd)}
  if name == "mnist_lenet5" and not args.smoke and not args.mnist.exists():
    return entry | {"status": "skipped", "reason": f"no MNIST at {args.mnist.name}"}
  print(f"[{name}] limit {limit:.0f} s", flush=True)
  t = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    tail = (proc.stdout + proc.stderr)[-3000:]
  except subprocess.TimeoutExpired as e:
    status = f"stopped at its {limit:.0f} s limit"
    tail = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else "")[
      -3000:
    ]
  seconds = time.perf_counter() - t
  print(f"[{name}] {status} in {seconds:.0f} s", flush=True)
  files = sorted(p.name for p in out_dir.glob(f"{name}.*"))
  return entry | {"status": status, "seconds": round(seconds, 1), "files": files, "log_tail": tail}


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out-dir", type=Path, default=HERE / "results" / "device")
  ap.add_argument(
    "--mnist", type=Path, default=Path(os.environ.get("AUTOSPARSE_MNIST_NPZ", DEFAULT_MNIST))
  )
  ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of PARTS")
  ap.add_argument("--time-scale", type=float, default=1.0, help="scales every part's limit")
  ap.add_argument("--smoke", action="store_true", help="every part in its smoke mode (CPU)")
  args = ap.parse_args(argv)
  names = args.parts.split(",")
  unknown = set(names) - set(PARTS)
  if unknown:
    ap.error(f"--parts: unknown {sorted(unknown)}; known: {list(PARTS)}")
  if args.smoke:
    args.time_scale = max(args.time_scale, 2.0)  # smoke parts compile on a busy CPU
  args.out_dir.mkdir(parents=True, exist_ok=True)
  head = C.header()
  parts, smoked = {}, {}
  for name in names:
    script = PARTS[name][0]
    if args.smoke and script in smoked:  # a smoke run ignores the sizes: once per script
      parts[name] = {"status": "skipped", "reason": f"smoke: same script as {smoked[script]}"}
      continue
    smoked[script] = name
    parts[name] = run_part(name, args, args.out_dir)
  payload = C.finish(head) | {"benchmark": "device_suite", "smoke": args.smoke, "parts": parts}
  (args.out_dir / "device_suite.json").write_text(json.dumps(payload, indent=1))
  failed = [n for n, p in parts.items() if p["status"] not in ("ok", "skipped")]
  print(f"device suite: {len(parts) - len(failed)}/{len(parts)} parts ok or skipped")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
