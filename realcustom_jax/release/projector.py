"""The authors' released projector, `ProjectorHighResMinAttn` (`models/projectors.py` of
github.com/bytedance/RealCustom), over their SigLIP + DINOv2 (global, local) features
(`realcustom_jax.release.encoder`). `release.model.ReleaseRealCustom` puts it in front
of the visual K/V, where the paper's model has `projectors.VisualProjection`.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# The released projector's widths (configs/realcustom_sigdino_highres.json).
RELEASE_VISION_DIM = 2176
RELEASE_OUT_DIM = 2048
RELEASE_DIM_HEAD = 64
TORCH_LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, used by the projector


class MinAttention(nn.Module):
  """The release's MinAttention: global queries attend to local keys / values.

  No output projection: the heads are concatenated back to heads * dim_head channels.
  """
  heads: int
  dim_head: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, local_features: Array, global_features: Array) -> Array:
    norm = lambda name: nn.LayerNorm(epsilon=TORCH_LAYER_NORM_EPS, dtype=self.dtype,
                                     name=name)
    inner = self.heads * self.dim_head
    dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
    queries = norm('norm1')(global_features)
    keys_values = norm('norm2')(local_features)
    split = lambda x: x.reshape(x.shape[0], x.shape[1], self.heads, self.dim_head)
    q = split(dense('to_q')(queries))
    k = split(dense('to_k')(keys_values))
    v = split(dense('to_v')(keys_values))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits / math.sqrt(self.dim_head), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v)
    return out.reshape(out.shape[0], out.shape[1], inner)


class SubjectProjector(nn.Module):
  """The release's `ProjectorHighResMinAttn` (adaptive_scale=False, as released).

  Attributes:
    vision_dim: encoder feature width (2176); a multiple of dim_head.
    out_dim: output width, the UNet's cross-attention width (2048).
    dim_head: MinAttention head width (64 -> vision_dim // 64 = 34 heads).
  """
  vision_dim: int = RELEASE_VISION_DIM
  out_dim: int = RELEASE_OUT_DIM
  dim_head: int = RELEASE_DIM_HEAD
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, global_features: Array, local_features: Array) -> Array:
    """Projects encoder features to visual tokens.

    Args:
      global_features: (B, Ng, vision_dim), the encoder's deep global features.
      local_features: (B, Nl, vision_dim), its interleaved local features.

    Returns:
      (B, Ng, out_dim) = projector_base(global) + MLP(MinAttention(local, global)).
    """
    if self.vision_dim % self.dim_head:
      raise ValueError(f'vision_dim {self.vision_dim} is not a multiple of dim_head '
                       f'{self.dim_head}')
    for name, x in (('global', global_features), ('local', local_features)):
      if x.ndim != 3 or x.shape[-1] != self.vision_dim:
        raise ValueError(f'{name} features must be (B, N, {self.vision_dim}), got '
                         f'{tuple(x.shape)}')
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)
    fused = MinAttention(self.vision_dim // self.dim_head, self.dim_head, self.dtype,
                         name='min_attention')(local_features, global_features)
    h = nn.gelu(dense(4 * self.vision_dim, 'projector_0')(fused), approximate=False)
    h = nn.gelu(dense(self.out_dim, 'projector_2')(h), approximate=False)
    h = dense(self.out_dim, 'projector_4')(h)
    h = nn.LayerNorm(epsilon=TORCH_LAYER_NORM_EPS, dtype=self.dtype, name='projector_5')(h)
    base = dense(self.out_dim, 'projector_base')(global_features)
    return (base + h).astype(jnp.float32)
