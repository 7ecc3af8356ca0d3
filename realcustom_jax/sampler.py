"""DDIM sampling with adaptive mask guidance (Sec. 3.3, Eqs. 11-13), jitted as one scan.

Every DDIM step makes two model calls:
  1. ONE batched call on [uncond, T2I] with the visual branch off. It gives eps(0) and
     the T2I prediction, and the T2I half's target-word cross-attention maps.
  2. The TI2I call with the subject, gated by the influence scope that the maps of
     call 1 give (Eq. 11), then the guidance of Eq. 13 and a deterministic DDIM update.
The whole loop is one `lax.scan` whose carry holds z_t and the latest scope. The guidance
scales and both gammas travel as one `GuidanceSettings` pytree, traced, so changing them
never recompiles.

The authors' release (github.com/bytedance/RealCustom) makes its masks differently, and
`GuidanceSettings` carries those choices as values:
  - `mask_strategy`: 'paper' (Eq. 11) or a tuple of the release's mask modes
    (`mask_strategies`, e.g. ('max_norm',)); `gamma_scope` is the release's `mask_scope`.
  - `mask_reused_step=N`: from step N on, the mask of step N-1 is reused. Eq. 13 needs
    the T2I prediction every step, so here only the mask is reused and no call is saved.
The release's own guidance (two branches with a negative image, its mask pass skipped
once the mask is reused) is its loop, `realcustom_jax.release.sampler`, built from this
module's pieces (`scan_denoise`, `text_only_maps`, `step_scope`, ...).
Several reference subjects (the release's `multiple_reference_image`): (B, R, n_t) word
weights, one word per reference, give per-reference masks (B, R, H, W) with a release
mask strategy; the model then gates each reference's visual attention by its own mask
and sums them (`attention.multi_reference_visual_attention`).
Everything a call is conditioned on travels as one `Conditions` pytree: a negative
prompt is its `uncond_text` (any features of the text shape); SDXL UNets also take
`added` (pooled text embedding and time ids) for the conditional rows and `uncond_added`
(the negative prompt's pooled embedding) for the unconditional ones.

`cfg_sample` is plain classifier-free guidance on the same UNet (one batched call per
step): the baseline of the tests and of `benchmarks/sampling.py`.
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax import mask_strategies
from realcustom_jax import model as model_lib
from realcustom_jax.attention import SELF_ATTENTION_MAPS
from realcustom_jax.mask import influence_scope
from realcustom_jax.schedules import Schedule
from realcustom_jax.schedules import SolverState
from realcustom_jax.schedules import solver_inputs
from realcustom_jax.schedules import solver_output
from realcustom_jax.schedules import solver_update
from realcustom_jax.selection import check_unit_interval

Array = jax.Array

# Sec. 4.1: DDIM 50 steps, w_t 7.5, w_i 12.5, gamma_scope 0.25, gamma_num 0.8 (the
# last four are `GuidanceSettings`' defaults).
PAPER_NUM_STEPS = 50


@struct.dataclass
class GuidanceSettings:
  """The sampling settings of Eqs. 10, 11 and 13, carried as ONE pytree into the scan.

  Build it with `create` or `from_config`, which check the values (a bare constructor
  does not). The four numbers are float32 scalars traced by jit: changing them never
  recompiles; so is `mask_reused_step` when set (an int32 scalar). `binary_mask`,
  `mask_strategy` and whether `mask_reused_step` is None are static.

  Attributes:
    guidance_text: w_t of Eq. 13 (unused by the release's loop).
    guidance_image: w_i of Eq. 13; the release's single guidance scale in its loop.
    gamma_scope: Eq. 11's ratio in [0, 1]; the release's `mask_scope` with a release
      mask strategy.
    gamma_num: Eq. 10's ratio in [0, 1].
    binary_mask: binary influence scope (Table 2 ablation) instead of the soft one
      (paper strategy only; release modes say 'binary' themselves).
    mask_strategy: 'paper' (Eq. 11) or the canonical tuple of release mask modes
      (`mask_strategies.RELEASE_MASK_MODES`).
    mask_reused_step: None (a new mask every step) or N >= 1: steps N, N+1, ... reuse
      the mask of step N-1, as the release's `mask_reused_step`.
  """
  guidance_text: Any = 7.5
  guidance_image: Any = 12.5
  gamma_scope: Any = 0.25
  gamma_num: Any = 0.8
  binary_mask: bool = struct.field(pytree_node=False, default=False)
  mask_strategy: Any = struct.field(pytree_node=False, default='paper')
  mask_reused_step: Any = None

  @classmethod
  def create(cls, guidance_text=7.5, guidance_image=12.5, gamma_scope=0.25, gamma_num=0.8,
             binary_mask: bool = False, mask_strategy='paper',
             mask_reused_step=None) -> 'GuidanceSettings':
    """Checked settings (defaults: the paper's, Sec. 4.1).

    Args:
      guidance_text: w_t.
      guidance_image: w_i (the release's guidance scale in its loop).
      gamma_scope: Eq. 11's ratio, or the release's mask_scope.
      gamma_num: Eq. 10's ratio.
      binary_mask: the paper's binary scope.
      mask_strategy: 'paper', or release mode names: one string or a sequence (e.g.
        ['max_norm'], as the release's --mask_strategy).
      mask_reused_step: None or an integer >= 1.

    Raises:
      ValueError: a non-finite or non-scalar value, a gamma outside [0, 1], an unknown
        mask strategy, binary_mask with a release strategy, or a
        mask_reused_step that is not an integer >= 1.
    """
    check_unit_interval('gamma_scope', gamma_scope)
    check_unit_interval('gamma_num', gamma_num)
    strategy = _mask_strategy(mask_strategy)
    if binary_mask and strategy != 'paper':
      raise ValueError("binary_mask is the paper strategy's switch: with a release "
                       "mask_strategy add 'binary' to its modes")
    return cls(guidance_text=_scalar('guidance_text', guidance_text),
               guidance_image=_scalar('guidance_image', guidance_image),
               gamma_scope=_scalar('gamma_scope', gamma_scope),
               gamma_num=_scalar('gamma_num', gamma_num), binary_mask=bool(binary_mask),
               mask_strategy=strategy, mask_reused_step=_reuse_step(mask_reused_step))

  @classmethod
  def from_config(cls, sampler_config, **overrides) -> 'GuidanceSettings':
    """From `config.sampler`, with keyword overrides where they are not None."""
    # The fields' defaults (the paper's) fill what the config lacks.
    values = {f.name: sampler_config.get(f.name, f.default) for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls.create(**values)


def _mask_strategy(value):
  """'paper' or the canonical release mode tuple; ValueError names the known modes."""
  if isinstance(value, str) and value == 'paper':
    return 'paper'
  try:
    return mask_strategies.check_mode(value)
  except (ValueError, TypeError):
    raise ValueError(f"mask_strategy must be 'paper' or release mask modes from "
                     f'{mask_strategies.RELEASE_MASK_MODES}, got {value!r}') from None


def _reuse_step(value):
  """None, or the step as an int32 scalar (traced: changing it does not recompile)."""
  if value is None:
    return None
  if isinstance(value, (jax.Array, np.ndarray)) and value.shape == () and (
      jnp.issubdtype(value.dtype, jnp.integer)):
    try:
      value = int(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
      return value  # already traced (a caller's own jit)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError('mask_reused_step must be None or an integer >= 1 (steps from N on '
                     f'reuse the mask of step N - 1), got {value!r}')
  return jnp.asarray(min(int(value), np.iinfo(np.int32).max), jnp.int32)


# ---------------------------------------------------------------------------------
# Equations
# ---------------------------------------------------------------------------------


def adaptive_mask_guidance(eps_uncond: Array, eps_text: Array, eps_image: Array,
                           w_t=7.5, w_i=12.5) -> Array:
  """Eq. 13: classifier-free guidance extended with the TI2I branch.

  z = eps(0) + w_t (eps_T2I - eps(0)) + w_i (eps_TI2I - eps_T2I).

  Args:
    eps_uncond: unconditional prediction eps(0).
    eps_text: T2I branch prediction (visual input 0).
    eps_image: TI2I branch prediction (subject, gated by the influence scope).
    w_t: text guidance scale (7.5 in the paper); may be traced.
    w_i: image guidance scale (12.5 in the paper); may be traced.

  Returns:
    The guided prediction.
  """
  return eps_uncond + w_t * (eps_text - eps_uncond) + w_i * (eps_image - eps_text)


def classifier_free_guidance(eps_uncond: Array, eps_text: Array, w_t=7.5) -> Array:
  """Plain classifier-free guidance: eps(0) + w_t (eps_T2I - eps(0)) (Eq. 13 with w_i=0)."""
  return eps_uncond + w_t * (eps_text - eps_uncond)


# ---------------------------------------------------------------------------------
# What the loops take and return
# ---------------------------------------------------------------------------------


@struct.dataclass
class Conditions:
  """Everything a sampler call is conditioned on, as ONE pytree (every field traced).

  Attributes:
    text: (B, n_t, c_t) prompt features.
    uncond_text: (B, n_t, c_t) unconditional features: the empty prompt's (the paper)
      or a negative prompt's (the release); nothing else changes.
    image: the subjects' features: (B, n_i, c_i) CLIP patch tokens, or with the
      release's projector the encoder's (global, local) pair, each (B, n, c) or
      (B, R, n, c) for R references. None for `cfg_sample`.
    word_weights: (B, n_t) target-word token weights ((B, R, n_t): one word per
      reference). None for `cfg_sample`.
    uncond_image: the negative image's features, of `image`'s shapes (the release
      encodes a black image): read by the release's loop only.
    added: SDXL only (required there): {'text_embeds': (B, P) pooled prompt embedding,
      'time_ids': (B, 6)} for the conditional rows.
    uncond_added: SDXL: the same for the unconditional rows (the negative prompt's
      pooled embedding); None: `added`.
    token_priority: (B, n_i) an order of the subject tokens that Eq. 10's top-k follows
      instead of the learned scores (diagnostics: an oracle or random choice); None:
      the learned scores.
  """
  text: Array
  uncond_text: Array
  image: Any = None
  word_weights: Optional[Array] = None
  uncond_image: Any = None
  added: Optional[dict] = None
  uncond_added: Optional[dict] = None
  token_priority: Optional[Array] = None

  @property
  def pair_text(self) -> Array:
    """[uncond, text] along the batch: the rows of the one batched text-only call."""
    return jnp.concatenate([self.uncond_text, self.text], axis=0)

  @property
  def pair_added(self) -> Optional[dict]:
    """SDXL's added conditioning for the [uncond, text] rows; None without it."""
    if self.added is None:
      return None
    return rows(self.added if self.uncond_added is None else self.uncond_added, self.added)


class SampleOutput(NamedTuple):
  """What the samplers return.

  Attributes:
    latents: (B, C, h, w) z_0.
    mask: (B, H, W) the influence scope of the last step (None for `cfg_sample`).
    masks: (S, B, H, W) the scope at every step, when the trajectory is asked for.
    x0: (S, B, C, h, w) the x0 prediction at every step, when asked for.
    selections: (S, B, n_i) bool, the subject tokens Eq. 10 kept at every step, when
      the trajectory is asked for (paper guidance with adaptive scoring only).
  """
  latents: Array
  mask: Optional[Array] = None
  masks: Optional[Array] = None
  x0: Optional[Array] = None
  selections: Optional[Array] = None


# ---------------------------------------------------------------------------------
# The jitted loops
# ---------------------------------------------------------------------------------


def rows(*trees):
  """Stacks pytrees of arrays (image features may be a tuple) along the batch axis."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def added_kwargs(cond) -> dict:
  """The `added_cond=` keyword of a model call: none at all for SD 1.x / 2.x."""
  return {} if cond is None else {'added_cond': cond}


def attention_maps(model: model_lib.RealCustom, params, *args, self_maps: bool,
                   **kwargs) -> tuple[Array, list[Array], list[Array]]:
  """(noise, per-layer word maps, per-layer self-attention maps if asked for)."""
  if not self_maps:
    return model_lib.word_maps(model, params, *args, **kwargs) + ([],)
  eps, state = model.apply({'params': params}, *args,
                           mutable=['intermediates', SELF_ATTENTION_MAPS], **kwargs)
  return (eps, list(jax.tree_util.tree_leaves(state['intermediates'])),
          list(jax.tree_util.tree_leaves(state[SELF_ATTENTION_MAPS])))


def reads_self_maps(settings: GuidanceSettings) -> bool:
  """Whether the mask strategy reads self-attention maps (some release modes)."""
  return (settings.mask_strategy != 'paper'
          and mask_strategies.uses_self_maps(settings.mask_strategy))


def scope_size(model: model_lib.RealCustom, settings: GuidanceSettings,
               latent_hw: tuple[int, int]) -> tuple[int, int]:
  """The scope's (H, W): the largest word map (Eq. 11), or half the latent (release)."""
  if settings.mask_strategy == 'paper':
    return model.unet.word_map_size(*latent_hw)
  return mask_strategies.mask_size(*latent_hw)


def step_scope(model: model_lib.RealCustom, settings: GuidanceSettings, maps: list[Array],
               self_maps: list[Array], size: tuple[int, int]) -> Array:
  """The influence scope of one step from the T2I word (and self-attention) maps."""
  if settings.mask_strategy == 'paper':
    return influence_scope(maps, settings.gamma_scope, binary=settings.binary_mask,
                           antialias=model.unet.mask_antialias)
  if self_maps:
    # Our choice (the release's UNet returns no self maps): the layers that work at the
    # mask's resolution, so that no (N, N) map needs resizing.
    n = size[0] * size[1]
    self_maps = [m for m in self_maps if m.shape[-1] == n]
    if not self_maps:
      raise ValueError(f'the self-map mask modes need a self-attention layer at the '
                       f'mask resolution {size} (half the latent); this UNet has none')
  return mask_strategies.release_mask(maps, settings.gamma_scope, size,
                                      settings.mask_strategy, self_maps)


def text_only_maps(model: model_lib.RealCustom, params, cond: Conditions, z: Array, t, *,
                   with_uncond: bool, self_maps: bool):
  """One call with the visual branch off: (noise, the T2I rows' word maps and self maps).

  The rows are [uncond, T2I] (`with_uncond`: eps(0) and eps_T2I in one call) or T2I
  alone; the word weights cover the T2I rows, so the layers compute word maps for them
  only (see `attention.Attention`).
  """
  b = z.shape[0]
  if with_uncond:
    z, text, added = jnp.concatenate([z, z], axis=0), cond.pair_text, cond.pair_added
  else:
    text, added = cond.text, cond.added
  eps, maps, self_ = attention_maps(model, params, z, jnp.full((z.shape[0],), t), text,
                                    word_weights=cond.word_weights, self_maps=self_maps,
                                    **added_kwargs(added))
  return eps, maps, [m[-b:] for m in self_]


def mask_is_fresh(settings: GuidanceSettings, i) -> Array:
  """Whether step i makes its own mask (steps from mask_reused_step on reuse)."""
  return i < settings.mask_reused_step


def initial_scope(cond: Conditions, settings: GuidanceSettings, batch: int,
                  size: tuple[int, int]) -> Array:
  """The scan's first carried scope: zeros (B, H, W), or (B, R, H, W) for R reference
  subjects ((B, R, n_t) word weights; a release mask strategy only)."""
  refs = tuple(cond.word_weights.shape[1:-1])
  if refs and settings.mask_strategy == 'paper':
    raise ValueError('several reference subjects need a release mask_strategy (per-'
                     'reference masks); the paper strategy (Eq. 11) makes one scope')
  return jnp.zeros((batch,) + refs + tuple(size), jnp.float32)


# guided_step(z_t, carried scope, step index, t, abar_t) -> (guided noise, this step's
# scope, the kept subject tokens or None).
GuidedStep = Callable[[Array, Array, Array, Array, Array], tuple[Array, Array, Optional[Array]]]


def scan_denoise(guided_step: GuidedStep, schedule: Schedule, latents: Array,
                 scope: Array, *, return_trajectory: bool) -> SampleOutput:
  """The DDIM scan every RealCustom loop shares: the carry holds z_t, the latest scope
  (`scope` first) and the solver's state; each step guides, then updates."""
  def step(carry, xs):
    z, carried, state = carry
    i, t, alpha_bar, alpha_bar_prev, order, alpha_bar_anchor = xs
    guided, scope, selection = guided_step(z, carried, i, t, alpha_bar)
    z_prev, x0, state = solver_update(z, guided, state, order, alpha_bar, alpha_bar_anchor,
                                       alpha_bar_prev, schedule)
    ys = (scope, x0, selection) if return_trajectory else None
    return (z_prev, scope, state), ys

  init = (latents, scope, SolverState(latents, jnp.zeros_like(latents)))
  xs = (jnp.arange(schedule.num_steps), schedule.timesteps, schedule.alpha_bar,
        schedule.alpha_bar_prev, *solver_inputs(schedule))
  (z0, scope, state), ys = jax.lax.scan(step, init, xs)
  out = solver_output(z0, state, schedule)
  if return_trajectory:
    return SampleOutput(out, scope, ys[0], ys[1], ys[2])
  return SampleOutput(out, scope)


def _realcustom_loop(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
                     cond: Conditions, settings: GuidanceSettings, *,
                     return_trajectory: bool) -> SampleOutput:
  """The RealCustom DDIM loop of Sec. 3.3 (traced once per static shape and flag set)."""
  b = latents.shape[0]
  size = scope_size(model, settings, latents.shape[2:])
  self_maps = reads_self_maps(settings)

  def guided_step(z, carried, i, t, alpha_bar):
    # [uncond, T2I] in ONE call: eps(0), eps_T2I and the T2I word (and self) maps.
    eps, maps, t2i_self_maps = text_only_maps(model, params, cond, z, t, with_uncond=True,
                                              self_maps=self_maps)
    # Eq. 11 from this step's T2I maps; it gates this step's TI2I branch (Eq. 12).
    scope = step_scope(model, settings, maps, t2i_self_maps, size)
    if settings.mask_reused_step is not None:
      # The T2I call stays (Eq. 13 reads eps_T2I); only the scope is reused.
      scope = jnp.where(mask_is_fresh(settings, i), scope, carried)
    args = ({'params': params}, z, jnp.full((b,), t), cond.text, cond.image)
    kwargs = dict(sqrt_alpha_bar=jnp.full((b,), jnp.sqrt(alpha_bar)),
                  gamma_num=settings.gamma_num, scope_mask=scope,
                  token_priority=cond.token_priority, **added_kwargs(cond.added))
    selection = None
    if return_trajectory and model.scoring_mode == 'adaptive':
      eps_image, state = model.apply(*args, mutable=['intermediates'], **kwargs)
      selection = state['intermediates']['scoring']['selected_tokens'][0]
    else:
      eps_image = model.apply(*args, **kwargs)
    guided = adaptive_mask_guidance(eps[:b], eps[b:], eps_image, settings.guidance_text,
                                    settings.guidance_image)
    return guided, scope, selection

  return scan_denoise(guided_step, schedule, latents, initial_scope(cond, settings, b, size),
                      return_trajectory=return_trajectory)


def _cfg_loop(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
              cond: Conditions, settings: GuidanceSettings, *,
              return_trajectory: bool) -> SampleOutput:
  """Plain classifier-free guidance DDIM loop on the same UNet (visual branch off)."""
  b = latents.shape[0]
  pair_text, pair_added = cond.pair_text, cond.pair_added

  def step(carry, xs):
    z, state = carry
    t, alpha_bar, alpha_bar_prev, order, alpha_bar_anchor = xs
    eps = model.apply({'params': params}, jnp.concatenate([z, z], axis=0),
                      jnp.full((2 * b,), t), pair_text, **added_kwargs(pair_added))
    guided = classifier_free_guidance(eps[:b], eps[b:], settings.guidance_text)
    z_prev, x0, state = solver_update(z, guided, state, order, alpha_bar, alpha_bar_anchor,
                                       alpha_bar_prev, schedule)
    return (z_prev, state), (x0 if return_trajectory else None)

  xs = (schedule.timesteps, schedule.alpha_bar, schedule.alpha_bar_prev,
        *solver_inputs(schedule))
  (z0, state), x0 = jax.lax.scan(step, (latents, SolverState(latents, jnp.zeros_like(latents))),
                                 xs)
  return SampleOutput(solver_output(z0, state, schedule),
                      x0=x0 if return_trajectory else None)


def build_sampler(model: model_lib.RealCustom, *, return_trajectory: bool = False,
                  max_traces: Optional[int] = None) -> Callable[..., SampleOutput]:
  """A jitted RealCustom sampler for one model: (params, schedule, latents, conditions,
  settings) -> SampleOutput.

  Everything is traced but the static fields of `settings`; jax.jit caches one
  executable per input shape and static setting. It does not validate: use `sample`.

  Args:
    model: the RealCustom module.
    return_trajectory: also return the per-step scopes and x0 predictions.
    max_traces: when set, fail on the (max_traces + 1)-th trace (chex), for tests.

  Returns:
    The jitted function.
  """
  return jitted_loop(_realcustom_loop, model, return_trajectory, max_traces)


def build_cfg_sampler(model: model_lib.RealCustom, *, return_trajectory: bool = False,
                      max_traces: Optional[int] = None) -> Callable[..., SampleOutput]:
  """A jitted plain-CFG sampler: (params, schedule, latents, conditions, settings);
  only the conditions' text fields and `settings.guidance_text` are read."""
  return jitted_loop(_cfg_loop, model, return_trajectory, max_traces)


def jitted_loop(loop, model, return_trajectory: bool, max_traces: Optional[int]):
  """jax.jit of (params, schedule, latents, conditions, settings) -> loop(model, ...)."""
  def fn(params, schedule, latents, conditions, settings):
    return loop(model, params, schedule, latents, conditions, settings,
                return_trajectory=return_trajectory)
  if max_traces is not None:
    fn = chex.assert_max_traces(fn, n=max_traces)
  return jax.jit(fn)


@functools.lru_cache(maxsize=16)
def cached_sampler(model: model_lib.RealCustom, return_trajectory: bool):
  """One jitted RealCustom sampler per (model, flag); jax.jit caches per shape inside."""
  return build_sampler(model, return_trajectory=return_trajectory)


@functools.lru_cache(maxsize=16)
def cached_cfg_sampler(model: model_lib.RealCustom, return_trajectory: bool):
  """One jitted plain-CFG sampler per (model, flag)."""
  return build_cfg_sampler(model, return_trajectory=return_trajectory)


# ---------------------------------------------------------------------------------
# The checked entry points
# ---------------------------------------------------------------------------------


def _scalar(name: str, value) -> Array:
  """A float32 scalar array, so Python floats and arrays share one trace."""
  try:
    array = np.asarray(value, np.float32)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return value  # already traced (a caller's own jit)
  if array.shape != ():
    raise ValueError(f'{name} must be a scalar, got shape {array.shape}')
  if not np.isfinite(array):
    raise ValueError(f'{name} must be finite, got {value!r}')
  return jnp.asarray(array)


def shapes(tree):
  return None if tree is None else jax.tree.map(jnp.shape, tree)


def check_text(model, schedule: Schedule, latents, cond) -> None:
  """What both samplers read: the schedule, z_T, the text rows and SDXL's added ones."""
  if not isinstance(schedule, Schedule):
    raise ValueError(f'schedule must be a schedules.Schedule, got {type(schedule).__name__}')
  if not isinstance(cond, Conditions):
    raise ValueError(f'conditions must be a sampler.Conditions, got {type(cond).__name__}')
  if latents.ndim != 4 or latents.shape[1] != model.unet.in_channels:
    raise ValueError(f'latents must be (B, {model.unet.in_channels}, h, w), got '
                     f'{tuple(latents.shape)}')
  if cond.text.ndim != 3 or cond.text.shape[0] != latents.shape[0]:
    raise ValueError(f'the text features must be (B={latents.shape[0]}, n_t, c_t), got '
                     f'{tuple(cond.text.shape)}')
  if tuple(cond.uncond_text.shape) != tuple(cond.text.shape):
    raise ValueError(f'the unconditional text features must have the text shape '
                     f'{tuple(cond.text.shape)}, got {tuple(cond.uncond_text.shape)} '
                     '(broadcast them first)')
  if model.unet.has_added_cond != (cond.added is not None):
    raise ValueError('added_cond (pooled text embedding and time ids) is required for an '
                     'SDXL UNet and refused for another')
  if cond.uncond_added is not None and shapes(cond.uncond_added) != shapes(cond.added):
    raise ValueError(f'uncond_added must have the shapes of added {shapes(cond.added)}, '
                     f'got {shapes(cond.uncond_added)}')


def check_settings(settings) -> GuidanceSettings:
  if settings is None:
    return GuidanceSettings.create()
  if not isinstance(settings, GuidanceSettings):
    raise ValueError('settings must be a sampler.GuidanceSettings (GuidanceSettings.create '
                     f'or .from_config), got {type(settings).__name__}')
  return settings


def check_subject_conditions(model: model_lib.RealCustom, schedule: Schedule, latents,
                             conditions: Conditions, settings) -> tuple[Conditions,
                                                                         GuidanceSettings]:
  """What every RealCustom loop reads, checked before tracing (one-line ValueErrors):
  the settings, the schedule, z_T, the text and subject rows, the word weights (as
  float32) and a token priority. Returns the conditions and settings to trace."""
  settings = check_settings(settings)
  check_text(model, schedule, latents, conditions)
  if conditions.image is None or conditions.word_weights is None:
    raise ValueError('RealCustom sampling needs the subject features and the word weights '
                     '(cfg_sample samples from the text alone)')
  model_lib.validate_inputs(model, conditions.text, conditions.image,
                            conditions.word_weights)
  if conditions.token_priority is not None:
    want = tuple(np.shape(conditions.image)[:2]) if not isinstance(
        conditions.image, (tuple, list)) else None
    if want is None or tuple(np.shape(conditions.token_priority)) != want:
      raise ValueError(f'token_priority must be (batch, image tokens) = {want} for the '
                       f'paper model, got {tuple(np.shape(conditions.token_priority))}')
  conditions = conditions.replace(
      word_weights=jnp.asarray(conditions.word_weights, jnp.float32))
  return conditions, settings


def sample(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
           conditions: Conditions, settings: Optional[GuidanceSettings] = None, *,
           return_trajectory: bool = False) -> SampleOutput:
  """RealCustom sampling (Sec. 3.3): DDIM with adaptive mask guidance, one jitted scan.

  Shapes are checked here, before tracing; the settings were checked when they were
  made. The number of steps is the schedule's length (static, checked when the
  schedule was made); the settings' numbers are traced (no recompilation when they
  change). The release's guidance is `realcustom_jax.release.sampler.sample`.

  Args:
    model: the RealCustom module.
    params: its full parameter tree (base + adapter).
    schedule: from `schedules.ddim_schedule` or `schedules.release_schedule`.
    latents: (B, C, h, w) z_T (already scaled by schedule.init_noise_sigma).
    conditions: text, unconditional text, subject features, word weights (and SDXL's
      added conditioning); `uncond_image` is not read.
    settings: w_t, w_i, gamma_scope, gamma_num, mask strategy and reuse; None: the
      paper's.
    return_trajectory: also return per-step scopes, x0 predictions and kept subject
      tokens; static.

  Returns:
    SampleOutput (masks/x0/selections filled when return_trajectory).

  Raises:
    ValueError: for shapes that disagree, settings that are not GuidanceSettings,
      several references with the paper's mask strategy, or added conditioning
      missing for an SDXL UNet or given to another.
  """
  conditions, settings = check_subject_conditions(model, schedule, latents, conditions,
                                                  settings)
  fn = cached_sampler(model, bool(return_trajectory))
  return fn(params, schedule, latents, conditions.replace(uncond_image=None), settings)


def cfg_sample(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
               conditions: Conditions, settings: Optional[GuidanceSettings] = None, *,
               return_trajectory: bool = False) -> SampleOutput:
  """Plain classifier-free-guidance sampling on the same UNet (the baseline).

  Args:
    model: the RealCustom module (its visual branch stays off).
    params: its parameters (the adapter part is unused).
    schedule: from `schedules.ddim_schedule` or `schedules.release_schedule`.
    latents: (B, C, h, w) z_T.
    conditions: its text fields (and SDXL's added ones) are read; the subject's are
      ignored.
    settings: only `guidance_text` (w_t) is used; None: 7.5.
    return_trajectory: also return per-step x0 predictions; static.

  Returns:
    SampleOutput with `latents` (and `x0`).
  """
  settings = check_settings(settings)
  check_text(model, schedule, latents, conditions)
  model_lib.validate_inputs(model, conditions.text)
  conditions = conditions.replace(image=None, word_weights=None, uncond_image=None)
  fn = cached_cfg_sampler(model, bool(return_trajectory))
  return fn(params, schedule, latents, conditions, settings)
