"""A sparse-training method written outside the package, as a user would: a static random
mask (a fixed sparse network), through the public method interface only."""

import dataclasses

import jax
import jax.numpy as jnp
import optax

import autosparse_jax as autosparse


@dataclasses.dataclass(frozen=True)
class StaticRandomMask:
  """Keeps a fixed random ``density`` fraction of every kernel (ndim >= 2)."""

  density: float
  seed: int = 0

  def components(self, prunable) -> autosparse.Components:
    del prunable  # every kernel

    def init(latent):
      if not jax.tree.leaves(latent.weights):  # optax.tree_map_params' placeholder
        return optax.EmptyState()
      leaves, treedef = jax.tree.flatten(latent.weights)
      keys = jax.random.split(jax.random.PRNGKey(self.seed), len(leaves))
      masks = [
        jax.random.uniform(k, w.shape) < self.density if w.ndim >= 2 else None
        for k, w in zip(keys, leaves, strict=True)
      ]
      return treedef.unflatten(masks)

    def update(grads, state, latent):
      del latent
      nones = jax.tree.map(lambda _: None, grads)
      return autosparse.MaskedGradients(grads, state, nones, nones), state

    def sparsify(latent, state, step):
      del step
      leaves, treedef = jax.tree.flatten(latent.weights)
      masks = treedef.flatten_up_to(state)
      eff = [None if m is None else jnp.where(m, w, 0) for w, m in zip(leaves, masks, strict=True)]
      return treedef.unflatten(eff), state

    return autosparse.Components(
      stage=autosparse.MaskStage(init, update, sparsify),
      annealing=autosparse.gradient_annealing(0.0),
      threshold_init=None,
      granularity="layer",
      threshold_optimizer=None,
    )
