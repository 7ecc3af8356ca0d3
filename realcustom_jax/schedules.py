"""Noise schedules and solver steps: what a sampling step does to z_t, apart from guidance.

  schedule = schedules.ddim_schedule(scheduler_config, 50)       # the paper's DDIM (Sec. 4.1)
  schedule = schedules.release_schedule(25, 'dpm_solver_2s')     # the authors' release

A `Schedule` holds concrete arrays (timesteps, abar_t, ...) computed once outside jit;
`solver_update` is one step of its solver (DDIM with eta 0, or the release's single-step
DPM-Solver++ of order 2), called inside the sampler's scan (`realcustom_jax.sampler`).
`alphas_cumprod` is the forward process of Eq. 2, which training noises with.
"""
from typing import Any, NamedTuple, Optional

from diffusers import FlaxDDIMScheduler
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax.runtime import notices

Array = jax.Array

# What a UNet may predict (diffusers' `prediction_type`); the sampler and the trainer
# both handle all three.
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')

# `Schedule.solver`: DDIM (eta 0) or the release's default single-step DPM-Solver++ of
# order 2 (`schedulers/dpm_s.py`, solver_type 'midpoint').
SOLVERS = ('ddim', 'dpm_solver_2s')
# The release's noise schedule (`schedulers/utils.py` `get_betas('squared_linear')`):
# SD's scaled-linear betas over 1000 training steps.
RELEASE_TRAIN_STEPS = 1000
RELEASE_BETA_START, RELEASE_BETA_END = 0.00085, 0.012



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
    with notices.flax_notice_silenced():
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
  scheduler = _ddim_scheduler(scheduler_config)
  train_steps = scheduler.config.num_train_timesteps
  num_steps = check_num_steps(num_steps, train_steps)
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
  num_steps = check_num_steps(num_steps, num_train_steps)
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


def solver_output(z0: Array, state: SolverState, schedule: Schedule) -> Array:
  return state.x0 if schedule.output == 'x0' else z0


def check_num_steps(num_steps, maximum: Optional[int] = None) -> int:
  """The step count as an int; ValueError (one line) unless it is an integer in [1, maximum].

  The one check of a step count: the schedules call it, so every caller (pipelines,
  CLIs, benchmarks) gets the same message.
  """
  if (isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer))
      or num_steps < 1):
    raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
  if maximum is not None and num_steps > maximum:
    raise ValueError(f'num_steps={num_steps} exceeds the {maximum} training timesteps')
  return int(num_steps)
