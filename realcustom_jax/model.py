"""RealCustom: the frozen SD UNet plus the trainable adapter (scoring + visual K/V).

Parameter tree: {'unet': <diffusers' UNet tree + to_k_visual/to_v_visual in each attn2>,
'scoring': <AdaptiveScoring> (absent with scoring='none'), 'visual_proj': <Dense +
LayerNorm>}. With projector='release_highres' (the authors' released model, see
`realcustom_jax.release.convert`), 'subject_projector' (the release's ProjectorHighResMinAttn)
replaces 'visual_proj' and there is no 'scoring'.

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
from realcustom_jax.projectors import PROJECTORS
from realcustom_jax.projectors import RELEASE_DIM_HEAD
from realcustom_jax.projectors import RELEASE_VISION_DIM
from realcustom_jax.projectors import SubjectProjector
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

# One subject: (B, n_i, c_i) CLIP tokens (paper), or the release encoder's
# (global (B, n_g, c), local (B, n_l, c)) pair; with R reference subjects each array
# gains an R axis after B (release projector only).
ImageFeatures = Union[Array, tuple[Array, Array]]


class RealCustom(nn.Module):
  """The extended UNet driven by the adaptive scoring module.

  Attributes:
    unet: the UNet (its config decides the cross-attention width).
    scoring_hidden: width of the score nets (0: image feature width).
    fusion: score fusion (Eq. 8 or a Table 3 ablation).
    scoring_mode: 'adaptive' (Eqs. 5-10) or 'none' (Table 3 ID-2: every image token
      enters the visual attention unscored; the tree has no 'scoring').
    projector: see PROJECTORS. 'release_highres' needs scoring_mode='none' (the
      release has no scoring) and takes the (global, local) features of
      `realcustom_jax.release.encoder.SubjectEncoder`.
    release_vision_dim: the release projector's input width (2176 as released).
    release_dim_head: its MinAttention head width (64 as released).
  """
  unet: RealCustomUNet
  scoring_hidden: int = 0
  fusion: str = 'timestep'
  scoring_mode: str = 'adaptive'
  visual_pool: str = 'paper'
  scoring_gain: bool = True
  score_normalization: str = 'softmax'
  projector: str = 'paper'
  release_vision_dim: int = RELEASE_VISION_DIM
  release_dim_head: int = RELEASE_DIM_HEAD

  def setup(self):
    if self.scoring_mode not in SCORINGS:
      raise ValueError(f'scoring must be one of {SCORINGS}, got {self.scoring_mode!r}')
    if self.projector not in PROJECTORS:
      raise ValueError(f'projector must be one of {PROJECTORS}, got {self.projector!r}')
    if self.projector == 'release_highres':
      if self.scoring_mode != 'none':
        raise ValueError("projector='release_highres' has no scoring module: use "
                         "scoring='none'")
      self.subject_projector = SubjectProjector(
          self.release_vision_dim, self.unet.cross_attention_dim, self.release_dim_head)
      return
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
      image_features: (B, n_i, c_i) CLIP patch tokens f_ci, or with the release
        projector the encoder's (global, local) pair, each (B, n, c) or (B, R, n, c)
        for R reference subjects; None: text only (T2I / unconditional branches,
        Sec. 3.3).
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
    if self.projector == 'release_highres':
      tokens = self._release_tokens(*image_features)
      selected = jnp.ones(tokens.shape[:-1], bool)
      if image_keep is not None:
        selected = selected & image_keep.reshape((-1,) + (1,) * (selected.ndim - 1))
      return self.unet(latents, timesteps, text_features, visual_tokens=tokens,
                       visual_token_mask=selected, scope_mask=scope_mask,
                       word_weights=word_weights, added_cond=added_cond)
    if sqrt_alpha_bar is None and self.scoring_mode == 'adaptive':
      raise ValueError('sqrt_alpha_bar is required with image_features (Eq. 8)')
    tokens = self.visual_proj(image_features)
    if self.scoring_mode == 'adaptive':
      scored_latents, latent_scope = latents, None
      if scope_mask is not None:
        h, w = latents.shape[2:]
        latent_scope = resize_scope(scope_mask, h, w)
        scored_latents = latents * latent_scope[:, None].astype(latents.dtype)
      # The score nets read the CLIP tokens; Eq. 9 scales the projected ones, whose
      # scale reaches the bias-free visual K/V (and so the loss) intact.
      scored = self.scoring(text_features, scored_latents, sqrt_alpha_bar, image_features,
                            gamma_num, tokens=tokens, latent_scope=latent_scope,
                            priority=token_priority,
                            straight_through=straight_through_selection)
      tokens, selected = scored.features, scored.selected
      if scored.keep is not None:
        selected = scored.keep  # float 0 / 1 with a gradient
    else:
      selected = jnp.ones(tokens.shape[:2], bool)
    if image_keep is not None:
      if jnp.issubdtype(selected.dtype, jnp.floating):
        selected = selected * image_keep[:, None].astype(selected.dtype)
      else:
        selected = selected & image_keep[:, None]
    return self.unet(latents, timesteps, text_features, visual_tokens=tokens,
                     visual_token_mask=selected, scope_mask=scope_mask, word_weights=word_weights,
                     added_cond=added_cond)

  def _release_tokens(self, global_features: Array, local_features: Array) -> Array:
    """The release's visual tokens: its projector over (global, local) features.

    The release's UNet applies the projector once per call and hands the same tokens
    to every attn2's to_k_vision / to_v_vision. R reference subjects (an axis after B)
    are projected one by one and come out (B, R, n_g, c_t).
    """
    if global_features.ndim == 4:
      b, r = global_features.shape[:2]
      flat = lambda x: x.reshape((b * r,) + x.shape[2:])
      tokens = self.subject_projector(flat(global_features), flat(local_features))
      return tokens.reshape((b, r) + tokens.shape[1:])
    return self.subject_projector(global_features, local_features)


# `config.model` as configs/tiny.py sets it; keys a config lacks take these values.
# The release_* keys are read with projector='release_highres' only (the authors' widths).
DEFAULT_MODEL_CONFIG = dict(scoring_hidden=0, fusion='timestep', scoring='adaptive',
                            visual_pool='paper', score_normalization='softmax',
                            numerics='torch', dtype='float32', attention_impl='auto',
                            mask_antialias=False, remat='none', projector='paper',
                            fused_word_maps=True,
                            release_vision_dim=RELEASE_VISION_DIM,
                            release_dim_head=RELEASE_DIM_HEAD)


def _model_settings(m) -> dict:
  return dict(DEFAULT_MODEL_CONFIG, **dict(m))


def check_model_config(m) -> None:
  """ValueError (one line) for a bad `config.model` value, before anything is built."""
  m = _model_settings(m)
  for key, allowed in (('dtype', tuple(DTYPES)), ('scoring', SCORINGS),
                       ('numerics', NUMERICS), ('fusion', FUSIONS),
                       ('visual_pool', VISUAL_POOLS),
                       ('score_normalization', SCORE_NORMALIZATIONS),
                       ('attention_impl', ATTENTION_IMPLS), ('projector', PROJECTORS)):
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
  if m['projector'] == 'release_highres':
    if m['scoring'] != 'none':
      raise ValueError("config.model.projector='release_highres' (the authors' released "
                       "model) has no scoring module: set config.model.scoring='none'")
    width, head = m['release_vision_dim'], m['release_dim_head']
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
               for v in (width, head)) or width % head:
      raise ValueError('config.model.release_vision_dim must be a positive multiple of '
                       f'config.model.release_dim_head, got {width!r} and {head!r}')


def build_model(config, unet_config) -> RealCustom:
  """The RealCustom module over a diffusers UNet config, with `config.model`'s settings.

  Keys `config.model` lacks take `DEFAULT_MODEL_CONFIG`'s values.

  Raises:
    ValueError: for a bad `config.model` value or an unsupported UNet.
  """
  check_model_config(config.model)
  m = _model_settings(config.model)
  unet = RealCustomUNet.from_config(
      unet_config, dtype=DTYPES[m['dtype']], remat=m['remat'],
      attention_impl=m['attention_impl'], mask_antialias=bool(m['mask_antialias']),
      numerics=m['numerics'], fused_word_maps=bool(m['fused_word_maps']))
  return RealCustom(unet=unet, scoring_hidden=int(m['scoring_hidden']), fusion=m['fusion'],
                    scoring_mode=m['scoring'], visual_pool=m['visual_pool'],
                    score_normalization=m['score_normalization'], projector=m['projector'],
                    release_vision_dim=int(m['release_vision_dim']),
                    release_dim_head=int(m['release_dim_head']))


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
  if image_features is not None and model.projector == 'release_highres':
    c = model.release_vision_dim
    if not isinstance(image_features, (tuple, list)) or len(image_features) != 2:
      raise ValueError('the release model takes image features as the encoder\'s '
                       f'(global, local) pair, got {type(image_features).__name__}')
    shapes = [tuple(x.shape) for x in image_features]
    lead = {s[:-2] for s in shapes}
    if (len(lead) != 1 or len(shapes[0]) not in (3, 4) or shapes[0][0] != b
        or any(s[-1] != c for s in shapes)):
      raise ValueError(f'release image features must be (B={b}, n, {c}) each, or '
                       f'(B={b}, R, n, {c}) for R references, got {shapes}')
  elif image_features is not None:
    if image_features.ndim != 3 or image_features.shape[0] != b:
      raise ValueError(f'image features must be (B={b}, n_i, c_i), got '
                       f'{tuple(image_features.shape)}')
  # R reference subjects (the release's per-reference (B, R, n, c) features) come with
  # one word-weight row each: (B, R, n_t).
  refs = ()
  if (image_features is not None and model.projector == 'release_highres'
      and image_features[0].ndim == 4):
    refs = (image_features[0].shape[1],)
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

  With the release projector, `image_dim` is ignored (its width is
  `model.release_vision_dim`) and `image_tokens` sizes both the global and local sets.
  """
  c, h, w = latent_shape
  if model.projector == 'release_highres':
    image = (jnp.zeros((1, image_tokens, model.release_vision_dim)),) * 2
  else:
    image = jnp.zeros((1, image_tokens, image_dim))
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
