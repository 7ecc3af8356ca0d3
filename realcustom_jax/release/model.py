"""The authors' released model: the paper's `model.RealCustom` with their projector.

`ReleaseRealCustom` keeps the frozen UNet and its visual K/V and replaces what feeds
them: no scoring module, `projector.SubjectProjector` (`ProjectorHighResMinAttn`) over
the release encoder's (global, local) features instead of the paper's `visual_proj`.
Its parameter tree is {'unet': ..., 'subject_projector': ...}. The release family
(`release/family.py`) builds it; the core never tests which model it runs.

`config.model` of a release config: projector 'release_highres', scoring 'none', and
the projector's widths `release_vision_dim` / `release_dim_head` (the authors' 2176 / 64).
"""
from typing import Any, Optional

import jax
import jax.numpy as jnp

from realcustom_jax import model as model_lib
from realcustom_jax.release.projector import RELEASE_DIM_HEAD
from realcustom_jax.release.projector import RELEASE_VISION_DIM
from realcustom_jax.release.projector import SubjectProjector

Array = jax.Array

PROJECTOR = 'release_highres'  # config.model.projector of the release family
# `config.model` keys of the release family, beside model.DEFAULT_MODEL_CONFIG's.
DEFAULT_RELEASE_MODEL_CONFIG = dict(projector=PROJECTOR, scoring='none',
                                    release_vision_dim=RELEASE_VISION_DIM,
                                    release_dim_head=RELEASE_DIM_HEAD)


class ReleaseRealCustom(model_lib.RealCustom):
  """The release's model (see the module doc).

  Attributes:
    release_vision_dim: the projector's input width (2176 as released).
    release_dim_head: its MinAttention head width (64 as released).
  """
  scoring_mode: str = 'none'
  release_vision_dim: int = RELEASE_VISION_DIM
  release_dim_head: int = RELEASE_DIM_HEAD

  def setup(self):
    if self.scoring_mode != 'none':
      raise ValueError("the release's model has no scoring module: use scoring='none'")
    self.subject_projector = SubjectProjector(
        self.release_vision_dim, self.unet.cross_attention_dim, self.release_dim_head)

  def visual_tokens(self, latents: Array, text_features: Array, image_features, *,
                    sqrt_alpha_bar: Optional[Array], gamma_num: Any,
                    scope_mask: Optional[Array], token_priority: Optional[Array],
                    straight_through_selection: bool) -> tuple[Array, Array]:
    """Every token of the projector over the (global, local) features.

    The release's UNet applies the projector once per call and hands the same tokens
    to every attn2's to_k_vision / to_v_vision. R reference subjects (an axis after B)
    are projected one by one and come out (B, R, n_g, c_t).
    """
    del latents, text_features, sqrt_alpha_bar, gamma_num, scope_mask, token_priority
    del straight_through_selection  # no scoring: nothing is selected
    global_features, local_features = image_features
    if global_features.ndim == 4:
      b, r = global_features.shape[:2]
      flat = lambda x: x.reshape((b * r,) + x.shape[2:])
      tokens = self.subject_projector(flat(global_features), flat(local_features))
      tokens = tokens.reshape((b, r) + tokens.shape[1:])
    else:
      tokens = self.subject_projector(global_features, local_features)
    return tokens, jnp.ones(tokens.shape[:-1], bool)

  def reference_count(self, image_features, batch: int) -> tuple[int, ...]:
    c = self.release_vision_dim
    if not isinstance(image_features, (tuple, list)) or len(image_features) != 2:
      raise ValueError('the release model takes image features as the encoder\'s '
                       f'(global, local) pair, got {type(image_features).__name__}')
    shapes = [tuple(x.shape) for x in image_features]
    lead = {s[:-2] for s in shapes}
    if (len(lead) != 1 or len(shapes[0]) not in (3, 4) or shapes[0][0] != batch
        or any(s[-1] != c for s in shapes)):
      raise ValueError(f'release image features must be (B={batch}, n, {c}) each, or '
                       f'(B={batch}, R, n, {c}) for R references, got {shapes}')
    return (shapes[0][1],) if len(shapes[0]) == 4 else ()

  def example_image_features(self, image_tokens: int, image_dim: int):
    """`image_tokens` sizes both the global and local sets; `image_dim` is unused (the
    projector's width is `release_vision_dim`)."""
    del image_dim
    return (jnp.zeros((1, image_tokens, self.release_vision_dim)),) * 2


def release_model_settings(m) -> dict:
  """`config.model` with the model defaults and the release's for the keys it lacks."""
  return {**model_lib.DEFAULT_MODEL_CONFIG, **DEFAULT_RELEASE_MODEL_CONFIG, **dict(m)}


def check_release_model_config(m) -> None:
  """ValueError (one line) for a `config.model` that is not the release's model."""
  model_lib.check_model_config(m)
  m = release_model_settings(m)
  if m['projector'] != PROJECTOR or m['scoring'] != 'none':
    raise ValueError(f"a release config needs config.model.projector='{PROJECTOR}' and "
                     "config.model.scoring='none' (the release has no scoring module; "
                     'configs/release_train.py)')
  width, head = m['release_vision_dim'], m['release_dim_head']
  if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
             for v in (width, head)) or width % head:
    raise ValueError('config.model.release_vision_dim must be a positive multiple of '
                     f'config.model.release_dim_head, got {width!r} and {head!r}')


def build_model(config, unet_config) -> ReleaseRealCustom:
  """The release model over a diffusers UNet config, with `config.model`'s settings."""
  check_release_model_config(config.model)
  m = release_model_settings(config.model)
  return ReleaseRealCustom(unet=model_lib.build_unet(config, unet_config),
                           release_vision_dim=int(m['release_vision_dim']),
                           release_dim_head=int(m['release_dim_head']))
