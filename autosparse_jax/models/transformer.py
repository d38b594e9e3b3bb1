"""ViT and a GPT-style decoder (pre-LN transformers) with their prunable rules.

Both are built from the same pre-LN block, ``x + attn(LN(x))`` then ``x + mlp(LN(x))``, with
``attn`` a ``nn.MultiHeadDotProductAttention`` (kernels ``query``, ``key``, ``value``, ``out``)
and ``mlp`` two Dense layers (``fc1``, ``fc2``) with a GELU. Sparse training prunes the
attention and MLP kernels only (:data:`TRANSFORMER_PRUNABLE`): the patch/token embeddings, the
position embeddings, the norms and the head stay dense, as in the sparse-transformer
literature. No dropout and no batch norm: the variables are ``{'params': ...}`` alone, and
``train`` only exists for the common call signature.

* :class:`ViT`: NHWC images -> ``patch x patch`` conv embedding -> class token + learned
  position embeddings -> blocks -> LN -> the class token's ``head``. ViT-Ti/16
  (Dosovitskiy et al.; Touvron et al.): width 192, depth 12, 3 heads, MLP 768.
* :class:`GPT`: int tokens ``(batch, length)`` -> token + learned position embeddings -> causal
  blocks -> LN -> ``head`` logits ``(batch, length, num_classes)``; ``num_classes`` is the
  vocabulary size (input and output).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from autosparse_jax.models._common import Dtype

#: Prunable rules for :func:`autosparse_jax.optax_chain` (first match wins): attention and MLP
#: kernels of every block; nothing else.
TRANSFORMER_PRUNABLE = (
  (r"block\d+/(attn/(query|key|value|out)|mlp/fc[12])/kernel$", True),
  (r".*", False),
)


class Mlp(nn.Module):
  """``fc2(gelu(fc1(x)))``, back to the input width."""

  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)


class Block(nn.Module):
  """Pre-LN transformer block; ``causal`` masks attention to earlier positions."""

  num_heads: int
  mlp_dim: int
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], bool)) if self.causal else None
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(x)
    y = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads, dtype=self.dtype, deterministic=True, name="attn"
    )(y, y, mask=mask)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(x)
    return x + Mlp(self.mlp_dim, dtype=self.dtype, name="mlp")(y)


_embed_init = nn.initializers.normal(stddev=0.02)


class ViT(nn.Module):
  """Vision transformer; defaults are ViT-Ti/16 for 224x224 images."""

  num_classes: int = 1000
  patch: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(
      self.width, (self.patch, self.patch), strides=self.patch, dtype=self.dtype, name="embedding"
    )(x)
    x = x.reshape((x.shape[0], -1, self.width))
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)).astype(x.dtype), x], 1)
    pos = self.param("pos_embedding", _embed_init, (1, x.shape[1], self.width))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, dtype=self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln")(x[:, 0])
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)


class GPT(nn.Module):
  """Causal decoder; defaults are GPT-2 small's layout (124M params at vocabulary 50257)."""

  num_classes: int = 50257  # the vocabulary size
  max_len: int = 1024
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train
    if tokens.ndim != 2 or tokens.shape[1] > self.max_len:
      raise ValueError(
        f"GPT input of shape {tokens.shape}: expected int tokens (batch, length <= {self.max_len})"
      )
    x = nn.Embed(self.num_classes, self.width, embedding_init=_embed_init, name="embedding")(
      tokens
    ).astype(self.dtype)
    pos = self.param("pos_embedding", _embed_init, (1, self.max_len, self.width))
    x = x + pos[:, : tokens.shape[1]].astype(self.dtype)
    for i in range(self.depth):
      x = Block(self.num_heads, self.mlp_dim, causal=True, dtype=self.dtype, name=f"block{i}")(x)
    x = nn.LayerNorm(dtype=self.dtype, name="ln")(x)
    x = nn.Dense(self.num_classes, use_bias=False, dtype=self.dtype, name="head")(x)
    return jnp.asarray(x, jnp.float32)
