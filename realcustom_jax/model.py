"""RealCustom: the frozen SD UNet plus the trainable adapter (scoring + visual K/V).

Parameter tree: {'unet': <diffusers' UNet tree + to_k_visual/to_v_visual in each attn2>,
'scoring': <AdaptiveScoring> (absent with scoring='none'), 'visual_proj': <Dense +
LayerNorm>}. The authors' released model is a subclass in the release family
(`realcustom_jax.release.model.ReleaseRealCustom`): it replaces `visual_tokens` (its
projector instead of 'visual_proj' and 'scoring') and the image-feature shapes; this
module never asks which model it is.

The order of the visual path is a deliberate deviation from a literal reading of the
paper (README, "What the paper leaves open"): the CLIP tokens are projected to the text
width first and Eq. 9's (1 + S) scales the *projected* tokens, right before the bias-free
visual K/V. Scaling before the projection's LayerNorm (adapter layout 1) was erased by
the normalisation, and with it every gradient to the score nets.
"""
from typing import Any, Mapping, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from realcustom_jax import adapter as adapter_lib
from realcustom_jax.attention import resize_scope
from realcustom_jax.kernels import ATTENTION_IMPLS
from realcustom_jax.projectors import VisualProjection
from realcustom_jax.scoring import FUSIONS
from realcustom_jax.scoring import SCORE_NORMALIZATIONS
from realcustom_jax.scoring import SCORINGS
from realcustom_jax.scoring import VISUAL_POOLS
from realcustom_jax.scoring import AdaptiveScoring
from realcustom_jax.unet import NUMERICS
from realcustom_jax.unet import RealCustomUNet
from realcustom_jax.unet import remat_policy

Array = jax.Array

# config.model.dtype / config.train.frozen_dtype names.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}

# One subject: (B, n_i, c_i) CLIP tokens (paper), or what a subclass's `visual_tokens`
# takes (the release's (global, local) pair, with an R axis for R references).
ImageFeatures = Union[Array, tuple[Array, Array]]


class RealCustom(nn.Module):
  """The extended UNet driven by the adaptive scoring module.

  Attributes:
    unet: the UNet (its config decides the cross-attention width).
    scoring_hidden: width of the score nets (0: image feature width).
    fusion: score fusion (Eq. 8 or a Table 3 ablation).
    scoring_mode: 'adaptive' (Eqs. 5-10) or 'none' (Table 3 ID-2: every image token
      enters the visual attention unscored; the tree has no 'scoring').
    visual_pool: Eq. 6's positions at inference (`scoring.VISUAL_POOLS`).
    scoring_gain: Eq. 9's (1 + S) scaling (False: an inference-time ablation).
    score_normalization: how the fused scores become S (`scoring.SCORE_NORMALIZATIONS`).
  """
  unet: RealCustomUNet
  scoring_hidden: int = 0
  fusion: str = 'timestep'
  scoring_mode: str = 'adaptive'
  visual_pool: str = 'paper'
  scoring_gain: bool = True
  score_normalization: str = 'softmax'

  def setup(self):
    if self.scoring_mode not in SCORINGS:
      raise ValueError(f'scoring must be one of {SCORINGS}, got {self.scoring_mode!r}')
    if self.scoring_mode == 'adaptive':
      self.scoring = AdaptiveScoring(self.scoring_hidden, self.fusion, self.visual_pool,
                                     self.scoring_gain, self.score_normalization)
    self.visual_proj = VisualProjection(self.unet.cross_attention_dim)

  def __call__(self, latents: Array, timesteps: Array, text_features: Array,
               image_features: Optional[ImageFeatures] = None, *,
               sqrt_alpha_bar: Optional[Array] = None,
               gamma_num: Any = 1.0,
               scope_mask: Optional[Array] = None,
               image_keep: Optional[Array] = None,
               word_weights: Optional[Array] = None,
               added_cond: Optional[Mapping[str, Array]] = None,
               token_priority: Optional[Array] = None,
               straight_through_selection: bool = False) -> Array:
    """Predicts the noise, with or without the subject.

    Args:
      latents: (B, 4, h, w) z_t.
      timesteps: (B,) timesteps t.
      text_features: (B, n_t, c_t) f_ct.
      image_features: (B, n_i, c_i) CLIP patch tokens f_ci (a subclass's own form,
        see `visual_tokens`); None: text only (T2I / unconditional branches, Sec. 3.3).
      sqrt_alpha_bar: (B,) sqrt(abar_t), the Eq. 8 fusion weight (adaptive scoring
        only).
      gamma_num: top-k ratio of Eq. 10 (traced is fine; unused with scoring 'none').
      scope_mask: (B, H0, W0) influence scope (Eq. 11): multiplies z_t before scoring and
        gates the visual attention output (Eq. 12), (B, R, H0, W0) with R references.
        None: no gating (training).
      image_keep: (B,) bool; False drops the subject for that row (condition dropout
        in training), making the row a pure T2I prediction.
      word_weights: (B, n_t) target-word token weights, or (B_w, n_t) for the last B_w
        rows only (their maps alone are computed); every attn2 then sows its word map
        (read them with `word_maps`).
      added_cond: SDXL's {'text_embeds', 'time_ids'} (see `RealCustomUNet`); None for
        SD 1.x / 2.x.
      token_priority: (B, n_i) an order for Eq. 10's top-k instead of the learned
        scores (diagnostics; see `AdaptiveScoring`); None: the learned scores.
      straight_through_selection: training only (static): Eq. 10's selection enters the
        visual attention as 0 / 1 weights with a straight-through gradient to the
        score nets (config.train.selection_gradient='straight_through').

    Returns:
      (B, 4, h, w) predicted noise.
    """
    if image_features is None:
      return self.unet(latents, timesteps, text_features, word_weights=word_weights,
                       added_cond=added_cond)
    tokens, selected = self.visual_tokens(
        latents, text_features, image_features, sqrt_alpha_bar=sqrt_alpha_bar,
        gamma_num=gamma_num, scope_mask=scope_mask, token_priority=token_priority,
        straight_through_selection=straight_through_selection)
    if image_keep is not None:
      keep = image_keep.reshape((-1,) + (1,) * (selected.ndim - 1))
      if jnp.issubdtype(selected.dtype, jnp.floating):
        selected = selected * keep.astype(selected.dtype)
      else:
        selected = selected & keep
    return self.unet(latents, timesteps, text_features, visual_tokens=tokens,
                     visual_token_mask=selected, scope_mask=scope_mask, word_weights=word_weights,
                     added_cond=added_cond)

  def visual_tokens(self, latents: Array, text_features: Array, image_features: Array, *,
                    sqrt_alpha_bar: Optional[Array], gamma_num: Any,
                    scope_mask: Optional[Array], token_priority: Optional[Array],
                    straight_through_selection: bool) -> tuple[Array, Array]:
    """The visual tokens and which of them the visual attention reads (Eqs. 5-10).

    The paper's: the CLIP tokens projected to the text width, scored and the top
    gamma_num kept (scoring 'adaptive'), or all of them (scoring 'none').

    Returns:
      (tokens (B, n_i, c_t), selected (B, n_i): bool, or float 0 / 1 with a
      straight-through gradient).
    """
    if sqrt_alpha_bar is None and self.scoring_mode == 'adaptive':
      raise ValueError('sqrt_alpha_bar is required with image_features (Eq. 8)')
    tokens = self.visual_proj(image_features)
    if self.scoring_mode != 'adaptive':
      return tokens, jnp.ones(tokens.shape[:2], bool)
    scored_latents, latent_scope = latents, None
    if scope_mask is not None:
      h, w = latents.shape[2:]
      latent_scope = resize_scope(scope_mask, h, w)
      scored_latents = latents * latent_scope[:, None].astype(latents.dtype)
    # The score nets read the CLIP tokens; Eq. 9 scales the projected ones, whose
    # scale reaches the bias-free visual K/V (and so the loss) intact.
    scored = self.scoring(text_features, scored_latents, sqrt_alpha_bar, image_features,
                          gamma_num, tokens=tokens, latent_scope=latent_scope,
                          priority=token_priority, straight_through=straight_through_selection)
    # `keep`: float 0 / 1 with a gradient (training with a straight-through selection).
    return scored.features, scored.selected if scored.keep is None else scored.keep

  def reference_count(self, image_features: ImageFeatures, batch: int) -> tuple[int, ...]:
    """Checks `image_features` (one line); returns (R,) for R reference subjects per
    sample (their word weights are then (B, R, n_t)), () for one."""
    if image_features.ndim != 3 or image_features.shape[0] != batch:
      raise ValueError(f'image features must be (B={batch}, n_i, c_i), got '
                       f'{tuple(image_features.shape)}')
    return ()

  def example_image_features(self, image_tokens: int, image_dim: int) -> ImageFeatures:
    """Zeros of one sample's image features (what `init` traces with)."""
    return jnp.zeros((1, image_tokens, image_dim))


# `config.model` as configs/tiny.py sets it; keys a config lacks take these values.
# 'projector' names the module in front of the visual K/V: 'paper' here; the release
# family's configs say 'release_highres' (`realcustom_jax.release.model`).
DEFAULT_MODEL_CONFIG = dict(scoring_hidden=0, fusion='timestep', scoring='adaptive',
                            visual_pool='paper', score_normalization='softmax',
                            numerics='torch', dtype='float32', attention_impl='auto',
                            mask_antialias=False, remat='none', projector='paper',
                            fused_word_maps=True)


def model_settings(m) -> dict:
  """`config.model` with `DEFAULT_MODEL_CONFIG`'s values for the keys it lacks."""
  return dict(DEFAULT_MODEL_CONFIG, **dict(m))


def check_model_config(m) -> None:
  """ValueError (one line) for a bad `config.model` value shared by every model family,
  before anything is built (each family checks its own: `Family.check_training_config`)."""
  m = model_settings(m)
  for key, allowed in (('dtype', tuple(DTYPES)), ('scoring', SCORINGS),
                       ('numerics', NUMERICS), ('fusion', FUSIONS),
                       ('visual_pool', VISUAL_POOLS),
                       ('score_normalization', SCORE_NORMALIZATIONS),
                       ('attention_impl', ATTENTION_IMPLS)):
    if m[key] not in allowed:
      raise ValueError(f'config.model.{key} must be one of {allowed}, got {m[key]!r}')
  try:
    remat_policy(m['remat'])
  except ValueError as e:
    raise ValueError(f'config.model.{e}') from None
  if not isinstance(m['fused_word_maps'], bool):
    raise ValueError('config.model.fused_word_maps must be True or False, got '
                     f"{m['fused_word_maps']!r}")
  hidden = m['scoring_hidden']
  if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
    raise ValueError('config.model.scoring_hidden must be an integer >= 0 (0: image '
                     f'feature width), got {hidden!r}')


def build_unet(config, unet_config) -> RealCustomUNet:
  """The extended UNet over a diffusers UNet config, with `config.model`'s numerics."""
  check_model_config(config.model)
  m = model_settings(config.model)
  return RealCustomUNet.from_config(
      unet_config, dtype=DTYPES[m['dtype']], remat=m['remat'],
      attention_impl=m['attention_impl'], mask_antialias=bool(m['mask_antialias']),
      numerics=m['numerics'], fused_word_maps=bool(m['fused_word_maps']))


def build_model(config, unet_config) -> RealCustom:
  """The paper's RealCustom module over a diffusers UNet config, with `config.model`'s
  settings (keys it lacks take `DEFAULT_MODEL_CONFIG`'s values).

  Raises:
    ValueError: for a bad `config.model` value or an unsupported UNet.
  """
  m = model_settings(config.model)
  if m['projector'] != 'paper':
    raise ValueError(f"config.model.projector={m['projector']!r} is not the paper's "
                     "model: build it through its family (realcustom_jax.pipelines)")
  unet = build_unet(config, unet_config)
  return RealCustom(unet=unet, scoring_hidden=int(m['scoring_hidden']), fusion=m['fusion'],
                    scoring_mode=m['scoring'], visual_pool=m['visual_pool'],
                    score_normalization=m['score_normalization'])


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
  refs = () if image_features is None else model.reference_count(image_features, b)
  want = (b,) + refs + (n_t,)
  if word_weights is not None and tuple(word_weights.shape) != want:
    names = ', '.join([f'B={b}'] + [f'R={r}' for r in refs] + [f'n_t={n_t}'])
    raise ValueError(f'word weights must be ({names}) (token indices out of range?), got '
                     f'{tuple(word_weights.shape)}')


def added_cond_shapes(unet: RealCustomUNet) -> Optional[dict[str, tuple[int]]]:
  """Per-sample shapes of SDXL's `added_cond` ({'text_embeds': (P,), 'time_ids': (6,)}),
  None for a UNet without added conditioning."""
  if not unet.has_added_cond:
    return None
  pooled = unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim
  return {'text_embeds': (pooled,), 'time_ids': (6,)}


def _init_fn(model: RealCustom, latent_shape, text_len: int, image_tokens: int,
             image_dim: int):
  """rng -> the full parameter tree (base + adapter), for one sample of these shapes.

  The image features are `model.example_image_features(image_tokens, image_dim)`.
  """
  c, h, w = latent_shape
  image = model.example_image_features(image_tokens, image_dim)
  args = (jnp.zeros((1, c, h, w)), jnp.zeros((1,), jnp.int32),
          jnp.zeros((1, text_len, model.unet.cross_attention_dim)), image)
  cond = added_cond_shapes(model.unet)
  if cond is not None:
    cond = {k: jnp.zeros((1,) + s) for k, s in cond.items()}
  return lambda r: model.init(r, *args, sqrt_alpha_bar=jnp.ones((1,)),
                              scope_mask=jnp.ones((1, h, w)), added_cond=cond)['params']


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
