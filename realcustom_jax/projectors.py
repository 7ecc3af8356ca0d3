"""How the paper's image features become visual tokens: the module in front of the
visual K/V (`VisualProjection`, trained here; the paper feeds CLIP tokens straight into
W_Ki / W_Vi, which SD 1.5's widths do not allow).

The authors' released projector (`ProjectorHighResMinAttn`) is the release family's:
`realcustom_jax.release.projector`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


class VisualProjection(nn.Module):
  """Maps CLIP image tokens (c_i) to the UNet's cross-attention width (c_t).

  The paper feeds f_ci straight into W_Ki / W_Vi; with SD 1.5 (c_t = 768) and CLIP
  ViT-L/14 (c_i = 1024) the widths differ, so, as IP-Adapter does, a trainable linear
  map + LayerNorm comes first. The visual K/V then have the text K/V's shapes and can
  start as their copies (`adapter.init_visual_kv_from_text`). The LayerNorm is why
  Eq. 9 is applied to this module's output, not to its input.
  """
  width: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Dense(self.width, name='dense')(x.astype(jnp.float32))
    return nn.LayerNorm(epsilon=1e-5, name='norm')(x)
