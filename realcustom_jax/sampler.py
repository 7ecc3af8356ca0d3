"""DDIM sampling with adaptive mask guidance (Sec. 3.3, Eqs. 11-13), jitted as one scan.

Every DDIM step makes two model calls:
  1. ONE batched call on [uncond, T2I] with the visual branch off. It gives eps(0) and
     the T2I prediction, and the T2I half's target-word cross-attention maps.
  2. The TI2I call with the subject, gated by the influence scope that the maps of
     call 1 give (Eq. 11), then the guidance of Eq. 13 and a deterministic DDIM update.
The whole loop is one `lax.scan` whose carry holds z_t and the latest scope. The guidance
scales and both gammas travel as one `GuidanceSettings` pytree, traced, so changing them
never recompiles.

The authors' release (github.com/bytedance/RealCustom) samples differently, and
`GuidanceSettings` selects its parts:
  - `mask_strategy`: 'paper' (Eq. 11) or a tuple of the release's mask modes
    (`release_mask`, e.g. ('max_norm',)); `gamma_scope` is the release's `mask_scope`.
  - `guidance_mode='release'`: two branches, eps = eps_u + w_i (eps_TI2I - eps_u), whose
    unconditional branch also has the visual input (the encoded negative image,
    `uncond_image_feats`) gated by the same mask, both in ONE batched call. The T2I call
    then serves the mask alone.
  - `mask_reused_step=N`: from step N on, the mask of step N-1 is reused. With release
    guidance the T2I mask pass sits in a `lax.cond` inside the scan and is skipped at
    run time (one UNet call of B rows less per step); with paper guidance Eq. 13 needs
    the T2I prediction every step, so only the mask is reused and no call is saved.
Several reference subjects (the release's `multiple_reference_image`): (B, R, n_t) word
weights, one word per reference, give per-reference masks (B, R, H, W) with a release
mask strategy; the model then gates each reference's visual attention by its own mask
and sums them (`attention.multi_reference_visual_attention`).
A negative prompt is the `uncond_emb` argument (any features of the text shape). SDXL
UNets also take `added_cond` (pooled text embedding and time ids) for the conditional
rows and `uncond_added_cond` (the negative prompt's pooled embedding) for the
unconditional ones.

`cfg_sample` is plain classifier-free guidance on the same UNet (one batched call per
step): the baseline of the tests and of `benchmarks/sampling.py`.
"""
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
import diffusers

# Before the Flax scheduler loads: importing it logs a deprecation notice.
diffusers.utils.logging.set_verbosity_error()

from diffusers import FlaxDDIMScheduler
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax import model as model_lib
from realcustom_jax import release_mask
from realcustom_jax.attention import SELF_ATTENTION_MAPS
from realcustom_jax.mask import influence_scope
from realcustom_jax.selection import check_unit_interval

Array = jax.Array

# What a UNet may predict (diffusers' `prediction_type`); the sampler and the trainer
# both handle all three.
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')

# Sec. 4.1: DDIM 50 steps, w_t 7.5, w_i 12.5, gamma_scope 0.25, gamma_num 0.8.
PAPER_NUM_STEPS = 50

# `Schedule.solver`: DDIM (eta 0) or the release's default single-step DPM-Solver++ of
# order 2 (`schedulers/dpm_s.py`, solver_type 'midpoint').
SOLVERS = ('ddim', 'dpm_solver_2s')
# The release's noise schedule (`schedulers/utils.py` `get_betas('squared_linear')`):
# SD's scaled-linear betas over 1000 training steps.
RELEASE_TRAIN_STEPS = 1000
RELEASE_BETA_START, RELEASE_BETA_END = 0.00085, 0.012

# `GuidanceSettings.guidance_mode`: Eq. 13 (three branches) or the release's two-branch
# guidance with a visual unconditional branch.
GUIDANCE_MODES = ('paper', 'release')


@struct.dataclass
class GuidanceSettings:
  """The sampling settings of Eqs. 10, 11 and 13, carried as ONE pytree into the scan.

  Build it with `create` or `from_config`, which check the values (a bare constructor
  does not). The four numbers are float32 scalars traced by jit: changing them never
  recompiles; so is `mask_reused_step` when set (an int32 scalar). `binary_mask`,
  `mask_strategy`, `guidance_mode` and whether `mask_reused_step` is None are static.

  Attributes:
    guidance_text: w_t of Eq. 13 (unused with guidance_mode 'release').
    guidance_image: w_i of Eq. 13; the release's single guidance scale with
      guidance_mode 'release'.
    gamma_scope: Eq. 11's ratio in [0, 1]; the release's `mask_scope` with a release
      mask strategy.
    gamma_num: Eq. 10's ratio in [0, 1].
    binary_mask: binary influence scope (Table 2 ablation) instead of the soft one
      (paper strategy only; release modes say 'binary' themselves).
    mask_strategy: 'paper' (Eq. 11) or the canonical tuple of release mask modes
      (`release_mask.RELEASE_MASK_MODES`).
    mask_reused_step: None (a new mask every step) or N >= 1: steps N, N+1, ... reuse
      the mask of step N-1, as the release's `mask_reused_step`.
    guidance_mode: 'paper' (Eq. 13) or 'release' (see the module docstring).
  """
  guidance_text: Any = 7.5
  guidance_image: Any = 12.5
  gamma_scope: Any = 0.25
  gamma_num: Any = 0.8
  binary_mask: bool = struct.field(pytree_node=False, default=False)
  mask_strategy: Any = struct.field(pytree_node=False, default='paper')
  mask_reused_step: Any = None
  guidance_mode: str = struct.field(pytree_node=False, default='paper')

  @classmethod
  def create(cls, guidance_text=7.5, guidance_image=12.5, gamma_scope=0.25, gamma_num=0.8,
             binary_mask: bool = False, mask_strategy='paper', mask_reused_step=None,
             guidance_mode: str = 'paper') -> 'GuidanceSettings':
    """Checked settings (defaults: the paper's, Sec. 4.1).

    Args:
      guidance_text: w_t.
      guidance_image: w_i (the release's guidance scale with guidance_mode 'release').
      gamma_scope: Eq. 11's ratio, or the release's mask_scope.
      gamma_num: Eq. 10's ratio.
      binary_mask: the paper's binary scope.
      mask_strategy: 'paper', or release mode names: one string or a sequence (e.g.
        ['max_norm'], as the release's --mask_strategy).
      mask_reused_step: None or an integer >= 1.
      guidance_mode: 'paper' or 'release'.

    Raises:
      ValueError: a non-finite or non-scalar value, a gamma outside [0, 1], an unknown
        mask strategy or guidance mode, binary_mask with a release strategy, or a
        mask_reused_step that is not an integer >= 1.
    """
    check_unit_interval('gamma_scope', gamma_scope)
    check_unit_interval('gamma_num', gamma_num)
    strategy = _mask_strategy(mask_strategy)
    if binary_mask and strategy != 'paper':
      raise ValueError("binary_mask is the paper strategy's switch: with a release "
                       "mask_strategy add 'binary' to its modes")
    if guidance_mode not in GUIDANCE_MODES:
      raise ValueError(f'guidance_mode must be one of {GUIDANCE_MODES}, got '
                       f'{guidance_mode!r}')
    return cls(guidance_text=_scalar('guidance_text', guidance_text),
               guidance_image=_scalar('guidance_image', guidance_image),
               gamma_scope=_scalar('gamma_scope', gamma_scope),
               gamma_num=_scalar('gamma_num', gamma_num), binary_mask=bool(binary_mask),
               mask_strategy=strategy, mask_reused_step=_reuse_step(mask_reused_step),
               guidance_mode=guidance_mode)

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
    return release_mask.check_mode(value)
  except (ValueError, TypeError):
    raise ValueError(f"mask_strategy must be 'paper' or release mask modes from "
                     f'{release_mask.RELEASE_MASK_MODES}, got {value!r}') from None


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
# Schedule
# ---------------------------------------------------------------------------------


@struct.dataclass
class Schedule:
  """DDIM timesteps and cumulative alphas, computed once outside jit.

  Attributes:
    timesteps: (S,) int32 timesteps t, from the noisiest down.
    alpha_bar: (S,) float32 abar_t at each timestep.
    alpha_bar_prev: (S,) float32 abar of the next (less noisy) timestep; the scheduler's
      final alpha after the last step.
    orders: (S,) int32 solver order of each step (SOLVERS 'dpm_solver_2s'); None: 1.
    alpha_bar_anchor: (S,) float32 abar of the previous step's timestep, where a
      second-order single-step DPM-Solver update starts; None with 'ddim'.
    init_noise_sigma: std of z_T (1 for DDIM).
    prediction_type: what the UNet predicts ('epsilon', 'v_prediction', 'sample').
    clip_sample: clip the x0 prediction to [-clip_sample_range, clip_sample_range].
    clip_sample_range: the clip bound.
    solver: 'ddim' (eta 0) or 'dpm_solver_2s' (the release's single-step
      DPM-Solver++, order 2, midpoint); see SOLVERS.
    output: what the sampler returns as `latents`: 'sample' (z_0 after the last update)
      or 'x0' (the last step's x0 prediction, what the release decodes).
  """
  timesteps: Array
  alpha_bar: Array
  alpha_bar_prev: Array
  orders: Optional[Array] = None
  alpha_bar_anchor: Optional[Array] = None
  init_noise_sigma: float = struct.field(pytree_node=False, default=1.0)
  prediction_type: str = struct.field(pytree_node=False, default='epsilon')
  clip_sample: bool = struct.field(pytree_node=False, default=False)
  clip_sample_range: float = struct.field(pytree_node=False, default=1.0)
  solver: str = struct.field(pytree_node=False, default='ddim')
  output: str = struct.field(pytree_node=False, default='sample')

  @property
  def num_steps(self) -> int:
    return int(self.timesteps.shape[0])


def _ddim_scheduler(scheduler_config: dict[str, Any]) -> FlaxDDIMScheduler:
  """diffusers' Flax DDIM scheduler from a scheduler config dict.

  Raises:
    ValueError: a beta schedule or prediction type diffusers (or we) do not support.
  """
  config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith('_')}
  try:
    scheduler = FlaxDDIMScheduler.from_config(config)
    scheduler.create_state()  # builds the betas: an unknown beta_schedule fails here
  except NotImplementedError as e:
    raise ValueError(f'unsupported scheduler config: {e}') from None
  if scheduler.config.prediction_type not in PREDICTION_TYPES:
    raise ValueError(f'unsupported prediction_type {scheduler.config.prediction_type!r} '
                     f'(one of {PREDICTION_TYPES})')
  return scheduler


def alphas_cumprod(scheduler_config: dict[str, Any]) -> np.ndarray:
  """abar_t of the forward process (Eq. 2), t = 0 .. T-1, as diffusers computes it.

  The one noise schedule of the project: training noises with it, `ddim_schedule` steps
  with it.
  """
  state = _ddim_scheduler(scheduler_config).create_state()
  return np.asarray(state.common.alphas_cumprod, np.float32)


def ddim_schedule(scheduler_config: dict[str, Any], num_steps: int) -> Schedule:
  """DDIM timesteps and alphas from a diffusers scheduler config (FlaxDDIMScheduler).

  Args:
    scheduler_config: scheduler/scheduler_config.json as a dict (SD 1.5: scaled_linear
      betas, steps_offset=1, set_alpha_to_one=False).
    num_steps: number of DDIM steps.

  Returns:
    The Schedule (concrete arrays; pass it into the jitted sampler).

  Raises:
    ValueError: for a non-positive step count, more steps than training timesteps, or an
      unknown prediction type or beta schedule.
  """
  if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
    raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
  scheduler = _ddim_scheduler(scheduler_config)
  train_steps = scheduler.config.num_train_timesteps
  if num_steps > train_steps:
    raise ValueError(f'num_steps={num_steps} exceeds the {train_steps} training timesteps')
  state = scheduler.set_timesteps(scheduler.create_state(), int(num_steps))
  timesteps = np.asarray(state.timesteps, np.int32)
  # The same abar as `alphas_cumprod`, from the state already built.
  alphas = np.asarray(state.common.alphas_cumprod, np.float32)
  # The same previous-timestep rule as FlaxDDIMScheduler.step.
  prev = timesteps - train_steps // int(num_steps)
  final = np.float32(state.final_alpha_cumprod)
  alpha_prev = np.where(prev >= 0, alphas[np.clip(prev, 0, None)], final).astype(np.float32)
  return Schedule(
      timesteps=jnp.asarray(timesteps), alpha_bar=jnp.asarray(alphas[timesteps]),
      alpha_bar_prev=jnp.asarray(alpha_prev),
      init_noise_sigma=float(state.init_noise_sigma),
      prediction_type=scheduler.config.prediction_type,
      clip_sample=bool(scheduler.config.clip_sample),
      clip_sample_range=float(scheduler.config.get('clip_sample_range', 1.0)))


def release_alphas_cumprod(num_train_steps: int = RELEASE_TRAIN_STEPS) -> np.ndarray:
  """abar_t of the release's 'squared_linear' betas, in float32 as torch computes them.

  betas = linspace(sqrt(0.00085), sqrt(0.012), T) ** 2 (diffusers' 'scaled_linear');
  abar = cumprod(1 - betas), accumulated in float32 like `torch.cumprod`.
  """
  betas = np.linspace(RELEASE_BETA_START ** 0.5, RELEASE_BETA_END ** 0.5, num_train_steps,
                      dtype=np.float32) ** 2
  return np.cumprod(1.0 - betas, dtype=np.float32)


def trailing_timesteps(num_steps: int, num_train_steps: int = RELEASE_TRAIN_STEPS
                       ) -> np.ndarray:
  """The release's default 'trailing' spacing: round(T - 1 - i T / S), i < S.

  25 of 1000: 999, 959, ..., 39 (the first step starts at pure noise's timestep, the
  last is not 0). Rounding is half-to-even, as torch's.
  """
  return np.round(num_train_steps - 1 - np.arange(num_steps) * (num_train_steps / num_steps)
                  ).astype(np.int32)


def release_schedule(num_steps: int, solver: str = 'dpm_solver_2s',
                     num_train_steps: int = RELEASE_TRAIN_STEPS) -> Schedule:
  """The schedule of the release's inference (`schedulers/`), not SDXL's scheduler config.

  Its `Scheduler` base: 'squared_linear' betas (`release_alphas_cumprod`), 'trailing'
  timesteps, set_alpha_to_one=True, epsilon prediction, no clipping; the release
  decodes the last step's x0 prediction (`step.pred_original_sample`), so `output` is
  'x0'. The two solvers differ in where the last step goes:
    - 'ddim' (`schedulers/ddim.py`): to the final alpha 1 (so z_0 = x0 there);
    - 'dpm_solver_2s' (`schedulers/dpm_s.py`, the release's default): to timestep 0;
      orders 1, 1, 2, 1, 2, ... (`get_order_list`; its `lower_order_final` touches an
      entry past the last step only, so an even-indexed last step stays order 2).

  Args:
    num_steps: inference steps S (the release: 25).
    solver: one of SOLVERS.
    num_train_steps: training timesteps (1000).

  Raises:
    ValueError: an unknown solver, or a step count outside [1, num_train_steps].
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver must be one of {SOLVERS}, got {solver!r}')
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
      or not 1 <= num_steps <= num_train_steps):
    raise ValueError(f'num_steps must be an integer in [1, {num_train_steps}], got '
                     f'{num_steps!r}')
  alphas = release_alphas_cumprod(num_train_steps)
  timesteps = trailing_timesteps(int(num_steps), num_train_steps)
  final = np.float32(1.0) if solver == 'ddim' else alphas[0]
  alpha_prev = np.append(alphas[timesteps[1:]], final).astype(np.float32)
  if solver == 'ddim':
    orders = np.ones(num_steps, np.int32)
  else:
    orders = np.array([1] + [i % 2 + 1 for i in range(num_steps - 1)], np.int32)
  anchor = alphas[np.concatenate([timesteps[:1], timesteps[:-1]])]
  return Schedule(
      timesteps=jnp.asarray(timesteps), alpha_bar=jnp.asarray(alphas[timesteps]),
      alpha_bar_prev=jnp.asarray(alpha_prev), orders=jnp.asarray(orders),
      alpha_bar_anchor=jnp.asarray(anchor), init_noise_sigma=1.0,
      prediction_type='epsilon', clip_sample=False, solver=solver, output='x0')


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


def ddim_step(sample: Array, model_output: Array, alpha_bar: Array, alpha_bar_prev: Array,
              schedule: Schedule) -> tuple[Array, Array]:
  """Deterministic DDIM update (eta = 0), as FlaxDDIMScheduler.step.

  Args:
    sample: (B, C, h, w) z_t.
    model_output: (B, C, h, w) guided model prediction at t.
    alpha_bar: scalar abar_t.
    alpha_bar_prev: scalar abar of the next timestep.
    schedule: supplies the (static) prediction type and clipping.

  Returns:
    (z_{t-1}, x0 prediction).
  """
  beta = 1.0 - alpha_bar
  if schedule.prediction_type == 'epsilon':
    x0 = (sample - jnp.sqrt(beta) * model_output) / jnp.sqrt(alpha_bar)
    eps = model_output
  elif schedule.prediction_type == 'v_prediction':
    x0 = jnp.sqrt(alpha_bar) * sample - jnp.sqrt(beta) * model_output
    eps = jnp.sqrt(alpha_bar) * model_output + jnp.sqrt(beta) * sample
  else:
    x0 = model_output
    eps = (sample - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(beta)
  if schedule.clip_sample:
    x0 = jnp.clip(x0, -schedule.clip_sample_range, schedule.clip_sample_range)
  prev = jnp.sqrt(alpha_bar_prev) * x0 + jnp.sqrt(1.0 - alpha_bar_prev) * eps
  return prev, x0


def _to_x0(sample: Array, model_output: Array, alpha_bar: Array, schedule: Schedule) -> Array:
  """The x0 prediction of a model output (the release's `convert_output`)."""
  return ddim_step(sample, model_output, alpha_bar, alpha_bar, schedule)[1]


def dpm_solver_2s_step(sample: Array, anchor: Array, x0: Array, x0_anchor: Array, order: Array,
                       alpha_bar: Array, alpha_bar_anchor: Array, alpha_bar_prev: Array
                       ) -> Array:
  """One step of single-step DPM-Solver++ (order 1 or 2, midpoint), as the release's.

  With alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), from s
  (this step) to t (the next timestep):
    order 1:  z_t = sigma_t / sigma_s z_s - alpha_t (e^-h - 1) x0_s,  h = lambda_t - lambda_s
  order 2 restarts from the previous step's input z_a (timestep a):
    h = lambda_t - lambda_a, r = (lambda_s - lambda_a) / h,
    z_t = sigma_t / sigma_a z_a - alpha_t (e^-h - 1) (x0_a + (x0_s - x0_a) / (2 r)).

  Args:
    sample: z_s.
    anchor: z_a, the previous step's input (order 2).
    x0: x0_s, this step's x0 prediction.
    x0_anchor: x0_a, the previous step's.
    order: 1 or 2 (traced: both updates are computed, one is kept).
    alpha_bar: abar_s; alpha_bar_anchor: abar_a; alpha_bar_prev: abar_t.

  Returns:
    z_t.
  """
  alpha = lambda a: jnp.sqrt(a)
  sigma = lambda a: jnp.sqrt(1.0 - a)
  lam = lambda a: jnp.log(alpha(a)) - jnp.log(sigma(a))
  lam_t = lam(alpha_bar_prev)
  first = ((sigma(alpha_bar_prev) / sigma(alpha_bar)) * sample
           - alpha(alpha_bar_prev) * (jnp.exp(-(lam_t - lam(alpha_bar))) - 1.0) * x0)
  h = lam_t - lam(alpha_bar_anchor)
  r0 = (lam(alpha_bar) - lam(alpha_bar_anchor)) / h
  d1 = (1.0 / r0) * (x0 - x0_anchor)
  decay = alpha(alpha_bar_prev) * (jnp.exp(-h) - 1.0)
  second = ((sigma(alpha_bar_prev) / sigma(alpha_bar_anchor)) * anchor - decay * x0_anchor
            - 0.5 * decay * d1)
  return jnp.where(order == 2, second, first)


class SolverState(NamedTuple):
  """What a solver carries between steps: z_a and x0_a of the last order-1 step."""
  anchor: Array
  x0: Array


def solver_inputs(schedule: Schedule) -> tuple[Array, Array]:
  """(orders, alpha_bar_anchor) per step, filled in for plain DDIM schedules."""
  orders = schedule.orders
  if orders is None:
    orders = jnp.ones(schedule.timesteps.shape, jnp.int32)
  anchor = schedule.alpha_bar if schedule.alpha_bar_anchor is None else schedule.alpha_bar_anchor
  return orders, anchor


def solver_update(z: Array, guided: Array, state: SolverState, order: Array,
                  alpha_bar: Array, alpha_bar_anchor: Array, alpha_bar_prev: Array,
                  schedule: Schedule) -> tuple[Array, Array, SolverState]:
  """One step of the schedule's solver: (z_prev, x0 prediction, new state).

  Args:
    z: z_s.
    guided: the guided model output at s.
    state: the carried SolverState (start: `SolverState(z_T, zeros)`).
    order, alpha_bar, alpha_bar_anchor, alpha_bar_prev: this step's entries of the
      schedule (`solver_inputs`).
    schedule: gives the (static) solver and prediction type.
  """
  if schedule.solver == 'ddim':
    z_prev, x0 = ddim_step(z, guided, alpha_bar, alpha_bar_prev, schedule)
    return z_prev, x0, SolverState(state.anchor, x0)
  x0 = _to_x0(z, guided, alpha_bar, schedule)
  # An order-1 step is where the next order-2 step restarts from.
  anchor = jnp.where(order == 1, z, state.anchor)
  z_prev = dpm_solver_2s_step(z, anchor, x0, state.x0, order, alpha_bar, alpha_bar_anchor,
                              alpha_bar_prev)
  return z_prev, x0, SolverState(anchor, x0)


def _solver_output(z0: Array, state: SolverState, schedule: Schedule) -> Array:
  return state.x0 if schedule.output == 'x0' else z0


# ---------------------------------------------------------------------------------
# The jitted loops
# ---------------------------------------------------------------------------------


class SampleOutput(NamedTuple):
  """What the samplers return.

  Attributes:
    latents: (B, C, h, w) z_0.
    mask: (B, H, W) the influence scope of the last step (None for `cfg_sample`).
    masks: (S, B, H, W) the scope at every step, when the trajectory is asked for.
    x0: (S, B, C, h, w) the x0 prediction at every step, when asked for.
  """
  latents: Array
  mask: Optional[Array] = None
  masks: Optional[Array] = None
  x0: Optional[Array] = None


def release_guidance(eps_uncond: Array, eps_image: Array, w=3.5) -> Array:
  """The release's guidance: eps_u + w (eps_TI2I - eps_u).

  `classifier_free_guidance_image_prompt_cascade` in its 'naive_global_direct' mode with
  rescale factor 0 (what its inference uses); eps_u has the negative prompt and the
  negative image. Eq. 13 with w_t = w_i = w and that eps_u.
  """
  return eps_uncond + w * (eps_image - eps_uncond)


def _rows(*trees):
  """Stacks pytrees of arrays (image features may be a tuple) along the batch axis."""
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


def _added(cond) -> dict:
  """The `added_cond=` keyword of a model call: none at all for SD 1.x / 2.x."""
  return {} if cond is None else {'added_cond': cond}


def _attention_maps(model: model_lib.RealCustom, params, *args, self_maps: bool,
                    **kwargs) -> tuple[Array, list[Array], list[Array]]:
  """(noise, per-layer word maps, per-layer self-attention maps if asked for)."""
  if not self_maps:
    return model_lib.word_maps(model, params, *args, **kwargs) + ([],)
  eps, state = model.apply({'params': params}, *args,
                           mutable=['intermediates', SELF_ATTENTION_MAPS], **kwargs)
  return (eps, list(jax.tree_util.tree_leaves(state['intermediates'])),
          list(jax.tree_util.tree_leaves(state[SELF_ATTENTION_MAPS])))


def _scope_size(model: model_lib.RealCustom, settings: GuidanceSettings,
                latent_hw: tuple[int, int]) -> tuple[int, int]:
  """The scope's (H, W): the largest word map (Eq. 11), or half the latent (release)."""
  if settings.mask_strategy == 'paper':
    return model.unet.word_map_size(*latent_hw)
  return release_mask.mask_size(*latent_hw)


def _scope(model: model_lib.RealCustom, settings: GuidanceSettings, maps: list[Array],
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
  return release_mask.release_mask(maps, settings.gamma_scope, size,
                                   settings.mask_strategy, self_maps)


def _realcustom_loop(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
                     text_emb: Array, uncond_emb: Array, image_feats: Array,
                     word_weights: Array, settings: GuidanceSettings,
                     uncond_image_feats: Optional[Array] = None,
                     added_cond: Optional[dict] = None,
                     uncond_added_cond: Optional[dict] = None, *,
                     return_trajectory: bool) -> SampleOutput:
  """The RealCustom DDIM loop (traced once per static shape and flag set)."""
  b = latents.shape[0]
  size = _scope_size(model, settings, latents.shape[2:])
  want_self_maps = (settings.mask_strategy != 'paper'
                    and release_mask.uses_self_maps(settings.mask_strategy))
  reuse = settings.mask_reused_step is not None
  release = settings.guidance_mode == 'release'
  # Everything derived from the conditions alone is built once, outside the scan body.
  pair_text = jnp.concatenate([uncond_emb, text_emb], axis=0)
  if added_cond is not None:
    pair_added = _rows(added_cond if uncond_added_cond is None else uncond_added_cond,
                       added_cond)
  else:
    pair_added = None
  if release:
    pair_image = _rows(uncond_image_feats, image_feats)

  def text_branches(z, t):
    """[uncond, T2I] in ONE call: eps(0), eps_T2I and the T2I word (and self) maps.

    The word weights cover the last b rows (the T2I half), so the layers compute word
    maps for those rows only (see `attention.Attention`).
    """
    eps, maps, self_maps = _attention_maps(
        model, params, jnp.concatenate([z, z], axis=0), jnp.full((2 * b,), t),
        pair_text, word_weights=word_weights, self_maps=want_self_maps,
        **_added(pair_added))
    return eps[:b], eps[b:], maps, [m[b:] for m in self_maps]

  def mask_pass(z, t):
    """The release's extra pass: T2I alone, for its maps; the scope."""
    _, maps, self_maps = _attention_maps(model, params, z, jnp.full((b,), t), text_emb,
                                         word_weights=word_weights, self_maps=want_self_maps,
                                         **_added(added_cond))
    return _scope(model, settings, maps, self_maps, size)

  def fresh(i):
    """Whether step i makes its own mask (steps from mask_reused_step on reuse)."""
    return i < settings.mask_reused_step

  def paper_step(z, carried, i, t, alpha_bar):
    eps_uncond, eps_text, maps, self_maps = text_branches(z, t)
    # Eq. 11 from this step's T2I maps; it gates this step's TI2I branch (Eq. 12).
    scope = _scope(model, settings, maps, self_maps, size)
    if reuse:  # the T2I call stays (Eq. 13 reads eps_T2I); only the scope is reused
      scope = jnp.where(fresh(i), scope, carried)
    eps_image = model.apply(
        {'params': params}, z, jnp.full((b,), t), text_emb, image_feats,
        sqrt_alpha_bar=jnp.full((b,), jnp.sqrt(alpha_bar)), gamma_num=settings.gamma_num,
        scope_mask=scope, **_added(added_cond))
    guided = adaptive_mask_guidance(eps_uncond, eps_text, eps_image,
                                    settings.guidance_text, settings.guidance_image)
    return guided, scope

  def release_step(z, carried, i, t, alpha_bar):
    if reuse:  # a real branch: from step N on the mask pass does not run
      scope = jax.lax.cond(fresh(i), mask_pass, lambda z, t: carried, z, t)
    else:
      scope = mask_pass(z, t)
    # [uncond, TI2I] in ONE call, both gated by the scope (as the release's two calls).
    eps = model.apply(
        {'params': params}, jnp.concatenate([z, z], axis=0), jnp.full((2 * b,), t),
        pair_text, pair_image, sqrt_alpha_bar=jnp.full((2 * b,), jnp.sqrt(alpha_bar)),
        gamma_num=settings.gamma_num, scope_mask=jnp.concatenate([scope, scope], axis=0),
        **_added(pair_added))
    return release_guidance(eps[:b], eps[b:], settings.guidance_image), scope

  def step(carry, xs):
    z, carried, state = carry
    i, t, alpha_bar, alpha_bar_prev, order, alpha_bar_anchor = xs
    guided, scope = (release_step if release else paper_step)(z, carried, i, t, alpha_bar)
    z_prev, x0, state = solver_update(z, guided, state, order, alpha_bar, alpha_bar_anchor,
                                       alpha_bar_prev, schedule)
    ys = (scope, x0) if return_trajectory else None
    return (z_prev, scope, state), ys

  # (B, H, W), or (B, R, H, W) for R reference subjects ((B, R, n_t) word weights).
  refs = tuple(word_weights.shape[1:-1])
  if refs and settings.mask_strategy == 'paper':
    raise ValueError('several reference subjects need a release mask_strategy (per-'
                     'reference masks); the paper strategy (Eq. 11) makes one scope')
  init = (latents, jnp.zeros((b,) + refs + tuple(size), jnp.float32),
          SolverState(latents, jnp.zeros_like(latents)))
  xs = (jnp.arange(schedule.num_steps), schedule.timesteps, schedule.alpha_bar,
        schedule.alpha_bar_prev, *solver_inputs(schedule))
  (z0, scope, state), ys = jax.lax.scan(step, init, xs)
  out = _solver_output(z0, state, schedule)
  if return_trajectory:
    return SampleOutput(out, scope, ys[0], ys[1])
  return SampleOutput(out, scope)


def _cfg_loop(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
              text_emb: Array, uncond_emb: Array, settings: GuidanceSettings, *,
              return_trajectory: bool) -> SampleOutput:
  """Plain classifier-free guidance DDIM loop on the same UNet (visual branch off)."""
  b = latents.shape[0]
  pair_text = jnp.concatenate([uncond_emb, text_emb], axis=0)

  def step(carry, xs):
    z, state = carry
    t, alpha_bar, alpha_bar_prev, order, alpha_bar_anchor = xs
    eps = model.apply({'params': params}, jnp.concatenate([z, z], axis=0),
                      jnp.full((2 * b,), t), pair_text)
    guided = classifier_free_guidance(eps[:b], eps[b:], settings.guidance_text)
    z_prev, x0, state = solver_update(z, guided, state, order, alpha_bar, alpha_bar_anchor,
                                       alpha_bar_prev, schedule)
    return (z_prev, state), (x0 if return_trajectory else None)

  xs = (schedule.timesteps, schedule.alpha_bar, schedule.alpha_bar_prev,
        *solver_inputs(schedule))
  (z0, state), x0 = jax.lax.scan(step, (latents, SolverState(latents, jnp.zeros_like(latents))),
                                 xs)
  return SampleOutput(_solver_output(z0, state, schedule),
                      x0=x0 if return_trajectory else None)


def build_sampler(model: model_lib.RealCustom, *, return_trajectory: bool = False,
                  max_traces: Optional[int] = None) -> Callable[..., SampleOutput]:
  """A jitted RealCustom sampler for one model.

  The returned function takes (params, schedule, latents, text_emb, uncond_emb,
  image_feats, word_weights, settings, uncond_image_feats=None, added_cond=None,
  uncond_added_cond=None), all traced but the static fields of `settings`; jax.jit
  caches one executable per input shape and static setting. `uncond_image_feats` is read
  with settings.guidance_mode 'release' only. It does not validate: use `sample`.

  Args:
    model: the RealCustom module.
    return_trajectory: also return the per-step scopes and x0 predictions.
    max_traces: when set, fail on the (max_traces + 1)-th trace (chex), for tests.

  Returns:
    The jitted function.
  """
  def fn(params, schedule, latents, text_emb, uncond_emb, image_feats, word_weights,
         settings, uncond_image_feats=None, added_cond=None, uncond_added_cond=None):
    return _realcustom_loop(model, params, schedule, latents, text_emb, uncond_emb,
                            image_feats, word_weights, settings, uncond_image_feats,
                            added_cond, uncond_added_cond,
                            return_trajectory=return_trajectory)
  if max_traces is not None:
    fn = chex.assert_max_traces(fn, n=max_traces)
  return jax.jit(fn)


def build_cfg_sampler(model: model_lib.RealCustom, *, return_trajectory: bool = False,
                      max_traces: Optional[int] = None) -> Callable[..., SampleOutput]:
  """A jitted plain-CFG sampler: (params, schedule, latents, text_emb, uncond_emb,
  settings); only `settings.guidance_text` is read."""
  def fn(params, schedule, latents, text_emb, uncond_emb, settings):
    return _cfg_loop(model, params, schedule, latents, text_emb, uncond_emb, settings,
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


def _check_common(model, schedule: Schedule, latents, text_emb, uncond_emb) -> None:
  if not isinstance(schedule, Schedule):
    raise ValueError(f'schedule must be a sampler.Schedule, got {type(schedule).__name__}')
  if latents.ndim != 4 or latents.shape[1] != model.unet.in_channels:
    raise ValueError(f'latents must be (B, {model.unet.in_channels}, h, w), got '
                     f'{tuple(latents.shape)}')
  if text_emb.ndim != 3 or text_emb.shape[0] != latents.shape[0]:
    raise ValueError(f'text_emb must be (B={latents.shape[0]}, n_t, c_t), got '
                     f'{tuple(text_emb.shape)}')
  if tuple(uncond_emb.shape) != tuple(text_emb.shape):
    raise ValueError(f'uncond_emb must have the text shape {tuple(text_emb.shape)}, got '
                     f'{tuple(uncond_emb.shape)} (broadcast it first)')


def _check_settings(settings) -> GuidanceSettings:
  if settings is None:
    return GuidanceSettings.create()
  if not isinstance(settings, GuidanceSettings):
    raise ValueError('settings must be a sampler.GuidanceSettings (GuidanceSettings.create '
                     f'or .from_config), got {type(settings).__name__}')
  return settings


def sample(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
           text_emb: Array, uncond_emb: Array, image_feats: Array, word_weights: Array,
           settings: Optional[GuidanceSettings] = None, *,
           uncond_image_feats: Optional[Array] = None,
           added_cond: Optional[dict] = None, uncond_added_cond: Optional[dict] = None,
           return_trajectory: bool = False) -> SampleOutput:
  """RealCustom sampling (Sec. 3.3): DDIM with adaptive mask guidance, one jitted scan.

  Shapes are checked here, before tracing; the settings were checked when they were
  made. The number of steps is the schedule's length (static); the settings' numbers
  are traced (no recompilation when they change).

  Args:
    model: the RealCustom module.
    params: its full parameter tree (base + adapter).
    schedule: from `ddim_schedule`.
    latents: (B, C, h, w) z_T (already scaled by schedule.init_noise_sigma).
    text_emb: (B, n_t, c_t) prompt features.
    uncond_emb: (B, n_t, c_t) unconditional features: the empty prompt's (the paper),
      or a negative prompt's (the release): nothing else changes.
    image_feats: (B, n_i, c_i) subject CLIP patch features.
    word_weights: (B, n_t) target-word token weights.
    settings: w_t, w_i, gamma_scope, gamma_num, mask strategy and reuse, guidance
      mode; None: the paper's.
    uncond_image_feats: the negative image's features (the release encodes a black
      image), of the image features' shapes, for the unconditional branch; required
      with settings.guidance_mode 'release', unused otherwise.
    added_cond: SDXL only (required there): {'text_embeds': (B, P) pooled prompt
      embedding, 'time_ids': (B, 6)} for the conditional rows.
    uncond_added_cond: SDXL: the same for the unconditional rows (the negative prompt's
      pooled embedding); None: added_cond.
    return_trajectory: also return per-step scopes and x0 predictions; static.

  Returns:
    SampleOutput (masks/x0 filled when return_trajectory).

  Raises:
    ValueError: for shapes that disagree, settings that are not GuidanceSettings,
      release guidance without uncond_image_feats, or added_cond missing for an SDXL
      UNet or given to another.
  """
  settings = _check_settings(settings)
  _check_common(model, schedule, latents, text_emb, uncond_emb)
  model_lib.validate_inputs(model, text_emb, image_feats, word_weights)
  shapes = lambda tree: None if tree is None else jax.tree.map(jnp.shape, tree)
  if settings.guidance_mode == 'release':
    if shapes(uncond_image_feats) != shapes(image_feats):
      raise ValueError("guidance_mode 'release' needs uncond_image_feats (the negative "
                       f"image) of the image features' shapes {shapes(image_feats)}, got "
                       f'{shapes(uncond_image_feats)}')
  else:
    uncond_image_feats = None
  if model.unet.has_added_cond != (added_cond is not None):
    raise ValueError('added_cond (pooled text embedding and time ids) is required for an '
                     'SDXL UNet and refused for another')
  if uncond_added_cond is not None and shapes(uncond_added_cond) != shapes(added_cond):
    raise ValueError(f'uncond_added_cond must have the shapes of added_cond '
                     f'{shapes(added_cond)}, got {shapes(uncond_added_cond)}')
  fn = cached_sampler(model, bool(return_trajectory))
  return fn(params, schedule, latents, text_emb, uncond_emb, image_feats,
            jnp.asarray(word_weights, jnp.float32), settings, uncond_image_feats,
            added_cond, uncond_added_cond)


def cfg_sample(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
               text_emb: Array, uncond_emb: Array,
               settings: Optional[GuidanceSettings] = None, *,
               return_trajectory: bool = False) -> SampleOutput:
  """Plain classifier-free-guidance DDIM sampling on the same UNet (the baseline).

  Args:
    model: the RealCustom module (its visual branch stays off).
    params: its parameters (the adapter part is unused).
    schedule: from `ddim_schedule`.
    latents: (B, C, h, w) z_T.
    text_emb: (B, n_t, c_t) prompt features.
    uncond_emb: (B, n_t, c_t) empty-prompt features.
    settings: only `guidance_text` (w_t) is used; None: 7.5.
    return_trajectory: also return per-step x0 predictions; static.

  Returns:
    SampleOutput with `latents` (and `x0`).
  """
  settings = _check_settings(settings)
  _check_common(model, schedule, latents, text_emb, uncond_emb)
  model_lib.validate_inputs(model, text_emb)
  fn = cached_cfg_sampler(model, bool(return_trajectory))
  return fn(params, schedule, latents, text_emb, uncond_emb, settings)
