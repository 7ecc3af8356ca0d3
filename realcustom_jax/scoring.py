"""Adaptive scoring module (Sec. 3.2, Fig. 4, Eqs. 5-10)."""
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from realcustom_jax.selection import top_fraction_mask

Array = jax.Array

FUSIONS = ('timestep', 'text', 'visual', 'mean')
# 'adaptive': Eqs. 5-10; 'none': Table 3 ID-2, every image token, unscored.
SCORINGS = ('adaptive', 'none')
# Eq. 6 at inference pools M-hat * z_t. 'paper': over every latent position, the zeroed
# ones included (a bias-free logit of 0 each); 'scope': over the positions inside the
# influence scope only (training, which has no scope, is the same either way).
VISUAL_POOLS = ('paper', 'scope')
# How the fused scores become S (Eqs. 8-9). 'softmax': the paper's, over the image
# tokens (S sums to 1: one token can take it all, and the others' gradient S (1 - S)
# vanishes); 'sigmoid': each token's own S in (0, 1), so every token's Eq. 9 gain keeps
# a gradient. Eq. 10's top-k is the same order either way.
SCORE_NORMALIZATIONS = ('softmax', 'sigmoid')
# The 'intermediates' name the fused scores (Eq. 8, before S) are sown under.
FUSED_SCORES = 'fused_scores'


def context_pooling(features: Array, logits: Array, where: Optional[Array] = None) -> Array:
  """Eqs. 5-7: softmax-weighted pooling of (B, n, c) features into a (B, c) context.

  Args:
    features: (B, n, c) text features f_ct or flattened latents z_t.
    logits: (B, n) pooling logits f W_a (Eq. 5 / Eq. 6 before the softmax).
    where: optional (B, n) bool, the positions the softmax runs over (a row with none
      pools every position).

  Returns:
    (B, c) context A^T f (Eq. 7).
  """
  logits = logits.astype(jnp.float32)
  if where is not None:
    where = where | ~jnp.any(where, axis=-1, keepdims=True)
    logits = jnp.where(where, logits, -jnp.inf)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bn,bnc->bc', weights, features.astype(jnp.float32))


def fuse_scores(text_scores: Array, visual_scores: Array, sqrt_alpha_bar: Array,
                fusion: str = 'timestep') -> Array:
  """Eq. 8: S = (1 - sqrt(abar_t)) S_textual + sqrt(abar_t) S_visual.

  Noisy early steps (sqrt(abar_t) near 0) trust the text; late steps the latents.
  The other `fusion` modes are the ablations of Table 3 (IDs 3-5).

  Args:
    text_scores: (B, n_i) textual scores.
    visual_scores: (B, n_i) visual scores.
    sqrt_alpha_bar: (B,) sqrt of the cumulative alpha at the current timestep.
    fusion: 'timestep' (Eq. 8), 'text', 'visual' or 'mean'.

  Returns:
    (B, n_i) fused scores, before the softmax.
  """
  if fusion == 'text':
    return text_scores
  if fusion == 'visual':
    return visual_scores
  if fusion == 'mean':
    return 0.5 * (text_scores + visual_scores)
  s = jnp.asarray(sqrt_alpha_bar, jnp.float32).reshape(-1, 1)
  return (1.0 - s) * text_scores + s * visual_scores


def modulate_features(image_features: Array, scores: Array) -> Array:
  """Eq. 9: f_ci <- f_ci * (1 + S), which lets the score nets learn through the UNet.

  The top-k of Eq. 10 has no gradient, so this product is the score nets' only path to
  the loss. Whatever follows it must keep a per-token scale: a per-token normalisation
  (LayerNorm) after it would erase S and with it the gradient (see `model.RealCustom`).
  """
  return image_features * (1.0 + scores[..., None]).astype(image_features.dtype)


def straight_through_keep(scores: Array, selected: Array) -> Array:
  """Eq. 10's 0 / 1 selection with a gradient: a straight-through estimator.

  The value is exactly `selected` (as float32); the gradient is that of a sigmoid of
  each score's distance to the selection threshold (midway between the last kept and
  the first dropped score), in units of the scores' spread, so the score nets learn
  from what keeping or dropping each token would change (`attention.visual_cross_
  attention` with a float mask). Our option, not the paper's (config.train.
  selection_gradient).

  Args:
    scores: (B, n) the scores Eq. 10 ranks.
    selected: (B, n) bool, Eq. 10's top-k of them.
  """
  scores = scores.astype(jnp.float32)
  low = jnp.min(jnp.where(selected, scores, jnp.inf), axis=-1, keepdims=True)
  high = jnp.max(jnp.where(selected, -jnp.inf, scores), axis=-1, keepdims=True)
  # All kept (or none): the threshold sits below (above) every score.
  low = jnp.where(jnp.isfinite(low), low, jnp.max(scores, axis=-1, keepdims=True) + 1.0)
  high = jnp.where(jnp.isfinite(high), high, jnp.min(scores, axis=-1, keepdims=True) - 1.0)
  threshold = jax.lax.stop_gradient(0.5 * (low + high))
  spread = jax.lax.stop_gradient(jnp.std(scores, axis=-1, keepdims=True)) + 1e-6
  soft = jax.nn.sigmoid((scores - threshold) / spread)
  return selected.astype(jnp.float32) + (soft - jax.lax.stop_gradient(soft))


class ScoreNet(nn.Module):
  """A lightweight two-layer MLP scoring each image token against a context."""
  hidden: int

  @nn.compact
  def __call__(self, image_features: Array, context: Array) -> Array:
    n = image_features.shape[1]
    tiled = jnp.broadcast_to(context[:, None, :], (context.shape[0], n, context.shape[-1]))
    x = jnp.concatenate([image_features.astype(jnp.float32), tiled], axis=-1)
    x = nn.gelu(nn.Dense(self.hidden, name='dense_0')(x))
    return nn.Dense(1, name='dense_1')(x)[..., 0]


class ScoringOutput(NamedTuple):
  features: Array  # (B, n_i, c) the modulated tokens (Eq. 9)
  selected: Array  # (B, n_i) bool, the top gamma_num fraction (Eq. 10)
  scores: Array  # (B, n_i) normalised fused scores S (softmax: the paper's)
  keep: Optional[Array] = None  # (B, n_i) float32 straight-through `selected`, if asked


class AdaptiveScoring(nn.Module):
  """Scores each subject image token and keeps the top `gamma_num` fraction.

  Attributes:
    hidden: width of the two score nets (0: the image feature width c_i).
    fusion: how textual and visual scores combine (see `fuse_scores`).
    visual_pool: Eq. 6's positions at inference (see VISUAL_POOLS).
    gain: Eq. 9's (1 + S) scaling; False is an inference-time ablation (the tokens
      enter unscaled, the selection is unchanged).
    normalization: how the fused scores become S (see SCORE_NORMALIZATIONS).
  """
  hidden: int = 0
  fusion: str = 'timestep'
  visual_pool: str = 'paper'
  gain: bool = True
  normalization: str = 'softmax'

  @nn.compact
  def __call__(self, text_features: Array, latents: Array, sqrt_alpha_bar: Array,
               image_features: Array, gamma_num, tokens: Optional[Array] = None,
               latent_scope: Optional[Array] = None, priority: Optional[Array] = None,
               straight_through: bool = False) -> ScoringOutput:
    """Runs Eqs. 5-10.

    Args:
      text_features: (B, n_t, c_t) f_ct.
      latents: (B, c, h, w) current latents z_t (times the scope at inference).
      sqrt_alpha_bar: (B,) sqrt(abar_t).
      image_features: (B, n_i, c_i) f_ci, what the score nets read.
      gamma_num: top-k ratio, scalar or (B,), may be traced (Eq. 10).
      tokens: (B, n_i, c) what Eq. 9 scales, one row per image token; default
        `image_features`. The model passes the projected tokens (see `model.RealCustom`).
      latent_scope: (B, h, w) the scope at the latents' size, or None (training); read
        with visual_pool='scope'.
      priority: (B, n_i) an order of the tokens that Eq. 10's top-k follows instead of
        the learned scores (a diagnostic: an oracle, anti-oracle or random choice); S
        still scales the tokens (Eq. 9). None: the learned scores (the paper).
      straight_through: also return `keep`, the selection with a straight-through
        gradient to the fused scores (training with config.train.selection_gradient).

    Returns:
      ScoringOutput.
    """
    if self.fusion not in FUSIONS:
      raise ValueError(f'fusion must be one of {FUSIONS}, got {self.fusion!r}')
    if self.visual_pool not in VISUAL_POOLS:
      raise ValueError(f'visual_pool must be one of {VISUAL_POOLS}, got {self.visual_pool!r}')
    if self.normalization not in SCORE_NORMALIZATIONS:
      raise ValueError(f'normalization must be one of {SCORE_NORMALIZATIONS}, got '
                       f'{self.normalization!r}')
    b, c = latents.shape[:2]
    z = latents.reshape(b, c, -1).transpose(0, 2, 1)  # (B, n_z, c)
    pool = lambda name, f: nn.Dense(1, use_bias=False, name=name)(f.astype(jnp.float32))[..., 0]
    text_context = context_pooling(text_features, pool('text_pool', text_features))  # Eq. 5, 7
    inside = None
    if self.visual_pool == 'scope' and latent_scope is not None:
      inside = latent_scope.reshape(b, -1) > 0
    visual_context = context_pooling(z, pool('visual_pool', z), inside)  # Eq. 6, 7
    hidden = self.hidden or image_features.shape[-1]
    text_scores = ScoreNet(hidden, name='text_score_net')(image_features, text_context)
    visual_scores = ScoreNet(hidden, name='visual_score_net')(image_features, visual_context)
    fused = fuse_scores(text_scores, visual_scores, sqrt_alpha_bar, self.fusion)
    if self.normalization == 'sigmoid':
      scores = jax.nn.sigmoid(fused)
    else:
      scores = jax.nn.softmax(fused, axis=-1)
    tokens = image_features if tokens is None else tokens
    selected = top_fraction_mask(scores if priority is None else priority, gamma_num)
    # Read by diagnostics that apply the model with mutable=['intermediates'] (the
    # toy reproduction's selection precision); a no-op otherwise.
    self.sow('intermediates', 'selected_tokens', selected)
    # What Eq. 10 ranks, before S's normalisation: read by the word-map score loss
    # (config.train.score_supervision, `adapter_training.score_supervision_loss`).
    self.sow('intermediates', FUSED_SCORES, fused)
    keep = straight_through_keep(fused, selected) if straight_through else None
    return ScoringOutput(modulate_features(tokens, scores) if self.gain else tokens,
                         selected, scores, keep)
