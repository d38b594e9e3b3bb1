"""The new methods through the training system: ``--config.method=`` names, config blocks,
a few steps of a real run on digits, and the FLOP convention of each."""

from __future__ import annotations

import pytest

pytest.importorskip("flax")
pytest.importorskip("orbax.checkpoint")

from test_train import digits_config, load_config  # noqa: E402

from autosparse_jax import flops, train  # noqa: E402
from autosparse_jax.train import config_lib, optim  # noqa: E402

pytestmark = pytest.mark.usefixtures("compilation_cache")

NEW = ("rigl", "rigl_ga", "set", "mest", "mest_ga", "topkast_pp")


@pytest.mark.parametrize("method", NEW)
def test_new_method_trains_a_few_steps_on_digits(method, tmp_path):
  config = digits_config(method=method, num_train_steps=4, eval_every_epochs=1.0)
  block = config.sparsity[method]
  if "update_every" in block:
    block.update_every = 2
    block.end_step = 3
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["eval/accuracy"] > 0.0
  for layer in ("fc1", "fc2", "head"):
    sparsity = result[f"sparsity/{layer}/kernel"]
    # the budget's 80%, plus at most RigL's drop fraction in grown weights that are still zero
    assert 0.8 - 1e-3 <= sparsity <= 0.8 + 0.3 * 0.2 + 1e-3, (layer, sparsity)


@pytest.mark.parametrize("variant", ["", "s90"])
def test_imagenet_resnet50_budgets_at_80_and_90(variant):
  config = load_config("imagenet_resnet50", variant or None)
  want = 0.9 if variant else 0.8
  for method in NEW:
    config.method = method
    config_lib.validate(config, device_count=1)
    m = optim.make_optimizer(config, steps_per_epoch=1251, total_steps=125_100).method
    inner = getattr(m, "method", m)  # Powerprop wraps TopKAST
    assert getattr(inner, "sparsity", getattr(inner, "forward_sparsity", None)) == want
    if method != "topkast_pp":
      assert inner.budget.kind == "erk" and inner.end_step == int(0.75 * 125_100)


def test_bad_budget_and_drop_schedule_name_the_field():
  config = digits_config(method="rigl")
  config.sparsity.rigl.budget = "erdos"
  with pytest.raises(ValueError, match="sparsity.rigl.budget"):
    config_lib.validate(config, device_count=1)
  config.sparsity.rigl.budget = "erk"
  config.sparsity.rigl.drop_schedule = "step"
  with pytest.raises(ValueError, match="sparsity.rigl.drop_schedule"):
    config_lib.validate(config, device_count=1)


def test_training_flop_conventions():
  fwd = {"a": 0.2, "b": 0.1}
  # RigL: the dense gradient one step in update_every.
  got = flops.weight_grad_density("rigl", fwd, update_every=100)
  assert got == pytest.approx({"a": 0.2 + 0.8 / 100, "b": 0.1 + 0.9 / 100})
  with pytest.raises(ValueError, match="update_every"):
    flops.weight_grad_density("rigl", fwd)
  # SET and MEST: random growth, sparse gradient.
  assert flops.weight_grad_density("set", fwd) == fwd
  assert flops.weight_grad_density("mest", fwd) == fwd
  # GA variants: dense while alpha > 0, then as the method.
  assert flops.weight_grad_density("rigl_ga", fwd, alpha=0.3, update_every=100) == 1.0
  assert flops.weight_grad_density("mest_ga", fwd, alpha=0.3) == 1.0
  assert flops.weight_grad_density("mest_ga", fwd, alpha=0.0) == fwd
  assert flops.weight_grad_density("topkast_pp", fwd, backward_sparsity=0.5) == {
    "a": 0.5,
    "b": 0.5,
  }
