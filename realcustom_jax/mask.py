"""Influence scope from the target word's cross-attention (Eq. 11)."""
from typing import Sequence

import jax
import jax.numpy as jnp

from realcustom_jax.selection import top_fraction_mask

Array = jax.Array


def aggregate_word_maps(maps: Sequence[Array], antialias: bool = False) -> Array:
  """Resizes every layer's (B, h, w) word map to the largest size and averages them.

  The paper resizes all layers' maps "to the same resolution (the same as the largest
  map size)"; the plain mean over layers is our reading (README, "What the paper leaves open").

  Args:
    maps: per-layer (B, h, w) word maps (any order).
    antialias: antialias when downsampling (never needed: maps only grow here).

  Returns:
    (B, H, W) aggregated map M at the largest layer resolution.
  """
  if not maps:
    raise ValueError('no word maps: the UNet has no cross-attention layer')
  b = maps[0].shape[0]
  height = max(m.shape[1] for m in maps)
  width = max(m.shape[2] for m in maps)
  resized = [m.astype(jnp.float32) if m.shape[1:] == (height, width) else
             jax.image.resize(m.astype(jnp.float32), (b, height, width), 'bilinear',
                              antialias=antialias)
             for m in maps]
  return jnp.mean(jnp.stack(resized), axis=0)


def influence_scope(maps: Sequence[Array], gamma_scope, binary: bool = False,
                    antialias: bool = False) -> Array:
  """Eq. 11: the influence scope M-hat of the given subject.

  Aggregates the word's maps over all layers, keeps the int(gamma_scope * H * W)
  highest positions (zeros elsewhere) and divides by the maximum, so that relevance
  differences inside the scope survive. `binary=True` gives the Table 2 ablation
  (ones inside the scope instead).

  Args:
    maps: per-layer (B, h, w) word maps, from `model.word_maps`.
    gamma_scope: top-k ratio in [0, 1] (0.25 in the paper); may be traced. Not checked
      here: `sampler.GuidanceSettings` checks it where the user gives it.
    binary: binary mask instead of max-normalised values.
    antialias: see `aggregate_word_maps`.

  Returns:
    (B, H, W) float32 scope in [0, 1].
  """
  m = aggregate_word_maps(maps, antialias)
  b, h, w = m.shape
  keep = top_fraction_mask(m.reshape(b, h * w), gamma_scope).reshape(b, h, w)
  if binary:
    return keep.astype(jnp.float32)
  kept = jnp.where(keep, m, 0.0)
  peak = jnp.max(kept, axis=(1, 2), keepdims=True)
  # An empty scope (gamma_scope * H * W < 1) stays all zeros instead of 0 / 0.
  return kept / jnp.where(peak > 0, peak, 1.0)
