"""RealCustom: the frozen SD UNet plus the trainable adapter (scoring + visual K/V).

Parameter tree: {'unet': <diffusers' UNet tree + to_k_visual/to_v_visual in each attn2>,
'scoring': <AdaptiveScoring> (absent with scoring='none'), 'visual_proj': <Dense +
LayerNorm>}.

The order of the visual path is a deliberate deviation from a literal reading of the
paper (README, "What the paper leaves open"): the CLIP tokens are projected to the text
width first and Eq. 9's (1 + S) scales the *projected* tokens, right before the bias-free
visual K/V. Scaling before the projection's LayerNorm (adapter layout 1) was erased by
the normalisation, and with it every gradient to the score nets.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from realcustom_jax import adapter as adapter_lib
from realcustom_jax.attention import resize_scope
from realcustom_jax.scoring import FUSIONS
from realcustom_jax.scoring import SCORINGS
from realcustom_jax.scoring import AdaptiveScoring
from realcustom_jax.unet import NUMERICS
from realcustom_jax.unet import RealCustomUNet

Array = jax.Array

# config.model.dtype / config.train.frozen_dtype names.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


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


class RealCustom(nn.Module):
  """The extended UNet driven by the adaptive scoring module.

  Attributes:
    unet: the UNet (its config decides the cross-attention width).
    scoring_hidden: width of the score nets (0: image feature width).
    fusion: score fusion (Eq. 8 or a Table 3 ablation).
    scoring_mode: 'adaptive' (Eqs. 5-10) or 'none' (Table 3 ID-2: every image token
      enters the visual attention unscored; the tree has no 'scoring').
  """
  unet: RealCustomUNet
  scoring_hidden: int = 0
  fusion: str = 'timestep'
  scoring_mode: str = 'adaptive'

  def setup(self):
    if self.scoring_mode not in SCORINGS:
      raise ValueError(f'scoring must be one of {SCORINGS}, got {self.scoring_mode!r}')
    if self.scoring_mode == 'adaptive':
      self.scoring = AdaptiveScoring(self.scoring_hidden, self.fusion)
    self.visual_proj = VisualProjection(self.unet.cross_attention_dim)

  def __call__(self, latents: Array, timesteps: Array, text_features: Array,
               image_features: Optional[Array] = None, *,
               sqrt_alpha_bar: Optional[Array] = None,
               gamma_num: Any = 1.0,
               scope_mask: Optional[Array] = None,
               image_keep: Optional[Array] = None,
               word_weights: Optional[Array] = None) -> Array:
    """Predicts the noise, with or without the subject.

    Args:
      latents: (B, 4, h, w) z_t.
      timesteps: (B,) timesteps t.
      text_features: (B, n_t, c_t) f_ct.
      image_features: (B, n_i, c_i) CLIP patch tokens f_ci; None: text only (T2I /
        unconditional branches, Sec. 3.3).
      sqrt_alpha_bar: (B,) sqrt(abar_t), the Eq. 8 fusion weight.
      gamma_num: top-k ratio of Eq. 10 (traced is fine; unused with scoring 'none').
      scope_mask: (B, H0, W0) influence scope (Eq. 11): multiplies z_t before scoring and
        gates the visual attention output (Eq. 12). None: no gating (training).
      image_keep: (B,) bool; False drops the subject for that row (condition dropout
        in training), making the row a pure T2I prediction.
      word_weights: (B, n_t) target-word token weights; every attn2 then sows its
        word map (read them with `word_maps`).

    Returns:
      (B, 4, h, w) predicted noise.
    """
    if image_features is None:
      return self.unet(latents, timesteps, text_features, word_weights=word_weights)
    if sqrt_alpha_bar is None:
      raise ValueError('sqrt_alpha_bar is required with image_features (Eq. 8)')
    tokens = self.visual_proj(image_features)
    if self.scoring_mode == 'adaptive':
      scored_latents = latents
      if scope_mask is not None:
        h, w = latents.shape[2:]
        scored_latents = latents * resize_scope(scope_mask, h, w)[:, None].astype(latents.dtype)
      # The score nets read the CLIP tokens; Eq. 9 scales the projected ones, whose
      # scale reaches the bias-free visual K/V (and so the loss) intact.
      scored = self.scoring(text_features, scored_latents, sqrt_alpha_bar, image_features,
                            gamma_num, tokens=tokens)
      tokens, selected = scored.features, scored.selected
    else:
      selected = jnp.ones(tokens.shape[:2], bool)
    if image_keep is not None:
      selected = selected & image_keep[:, None]
    return self.unet(latents, timesteps, text_features, visual_tokens=tokens,
                     visual_token_mask=selected, scope_mask=scope_mask, word_weights=word_weights)


ATTENTION_IMPLS = ('xla', 'cudnn', 'auto')


# `config.model` as configs/tiny.py sets it; keys a config lacks take these values.
DEFAULT_MODEL_CONFIG = dict(scoring_hidden=0, fusion='timestep', scoring='adaptive',
                            numerics='torch', dtype='float32', attention_impl='xla',
                            mask_antialias=False, remat=False)


def _model_settings(m) -> dict:
  return dict(DEFAULT_MODEL_CONFIG, **dict(m))


def check_model_config(m) -> None:
  """ValueError (one line) for a bad `config.model` value, before anything is built."""
  m = _model_settings(m)
  for key, allowed in (('dtype', tuple(DTYPES)), ('scoring', SCORINGS),
                       ('numerics', NUMERICS), ('fusion', FUSIONS),
                       ('attention_impl', ATTENTION_IMPLS)):
    if m[key] not in allowed:
      raise ValueError(f'config.model.{key} must be one of {allowed}, got {m[key]!r}')
  hidden = m['scoring_hidden']
  if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
    raise ValueError('config.model.scoring_hidden must be an integer >= 0 (0: image '
                     f'feature width), got {hidden!r}')


def build_model(config, unet_config) -> RealCustom:
  """The RealCustom module over a diffusers UNet config, with `config.model`'s settings.

  Keys `config.model` lacks take `DEFAULT_MODEL_CONFIG`'s values.

  Raises:
    ValueError: for a bad `config.model` value or an unsupported UNet.
  """
  check_model_config(config.model)
  m = _model_settings(config.model)
  unet = RealCustomUNet.from_config(
      unet_config, dtype=DTYPES[m['dtype']], remat=bool(m['remat']),
      attention_impl=m['attention_impl'], mask_antialias=bool(m['mask_antialias']),
      numerics=m['numerics'])
  return RealCustom(unet=unet, scoring_hidden=int(m['scoring_hidden']), fusion=m['fusion'],
                    scoring_mode=m['scoring'])


def word_maps(model: RealCustom, params, *args, **kwargs) -> tuple[Array, list[Array]]:
  """Runs the model and returns (noise, per-layer word maps), functionally.

  The maps come from the 'intermediates' collection each attn2 sows into; pass
  `word_weights=`. Layer order follows the parameter tree, which does not matter for
  Eq. 11's mean.
  """
  if kwargs.get('word_weights') is None:
    raise ValueError('word_maps needs word_weights=')
  eps, state = model.apply({'params': params}, *args, mutable=['intermediates'], **kwargs)
  return eps, list(jax.tree_util.tree_leaves(state['intermediates']))


def validate_inputs(model: RealCustom, text_features, image_features=None,
                    word_weights=None) -> None:
  """Checks shapes before tracing, so mistakes read as one-line errors.

  Raises:
    ValueError: text width differing from the UNet's cross-attention width, batch
      sizes that disagree, or word weights whose length is not the text length.
  """
  c_t = model.unet.cross_attention_dim
  if text_features.ndim != 3 or text_features.shape[-1] != c_t:
    raise ValueError(f'text features must be (B, n_t, {c_t}) for this UNet, got '
                     f'{tuple(text_features.shape)}')
  b, n_t = text_features.shape[:2]
  if image_features is not None:
    if image_features.ndim != 3 or image_features.shape[0] != b:
      raise ValueError(f'image features must be (B={b}, n_i, c_i), got '
                       f'{tuple(image_features.shape)}')
  if word_weights is not None and tuple(word_weights.shape) != (b, n_t):
    raise ValueError(f'word weights must be (B={b}, n_t={n_t}) (token indices out of '
                     f'range?), got {tuple(word_weights.shape)}')


def _init_fn(model: RealCustom, latent_shape, text_len: int, image_tokens: int,
             image_dim: int):
  """rng -> the full parameter tree (base + adapter), for one sample of these shapes."""
  c, h, w = latent_shape
  args = (jnp.zeros((1, c, h, w)), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, text_len, model.unet.cross_attention_dim)),
          jnp.zeros((1, image_tokens, image_dim)))
  return lambda r: model.init(r, *args, sqrt_alpha_bar=jnp.ones((1,)),
                              scope_mask=jnp.ones((1, h, w)))['params']


def init_params(model: RealCustom, rng: Array, latent_shape, text_len: int,
                image_tokens: int, image_dim: int) -> dict:
  """Random init of the full tree (base + adapter), jitted."""
  return jax.jit(_init_fn(model, latent_shape, text_len, image_tokens, image_dim))(rng)


def param_shapes(model: RealCustom, latent_shape, text_len: int, image_tokens: int,
                 image_dim: int) -> dict:
  """The full tree's shapes and dtypes (`jax.eval_shape`: no FLOPs, no memory)."""
  init = _init_fn(model, latent_shape, text_len, image_tokens, image_dim)
  return jax.eval_shape(init, jax.random.PRNGKey(0))


def init_adapter_params(model: RealCustom, rng: Array, latent_shape, text_len: int,
                        image_tokens: int, image_dim: int) -> dict:
  """Random adapter (scoring, visual projection, visual K/V) only.

  The jitted init returns just the adapter subtree, so XLA drops the random UNet it
  would otherwise build (860M parameters for SD 1.5).
  """
  init = _init_fn(model, latent_shape, text_len, image_tokens, image_dim)
  return jax.jit(lambda r: adapter_lib.split_params(init(r))[1])(rng)
