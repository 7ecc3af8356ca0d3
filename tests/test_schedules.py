"""Noise schedules and solver steps: DDIM against diffusers' scheduler, the release's
schedules and solvers (`schedules.release_schedule`) against its own schedulers
(tests/fixtures/release_scheduler, made by its make_fixtures.py)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest


from realcustom_jax import schedules
from realcustom_jax.loading import tiny
from realcustom_jax.release import tiny_sdxl

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'release_scheduler',
                       'release_scheduler.npz')
STEPS = (25, 30, 7, 4, 1)
SOLVERS = {'ddim': 'ddim', 'dpm': 'dpm_solver_2s'}


@pytest.fixture(scope='module')
def release():
  with np.load(FIXTURE) as z:
    return dict(z)


def _trajectory(schedule, z, eps):
  """Our solver fed the release's per-step model outputs: (z after each step, x0s)."""
  def step(carry, xs):
    z, state = carry
    e, order, alpha_bar, anchor, alpha_prev = xs
    z, x0, state = schedules.solver_update(z, e, state, order, alpha_bar, anchor, alpha_prev,
                                         schedule)
    return (z, state), (z, x0)
  orders, anchors = schedules.solver_inputs(schedule)
  init = (z, schedules.SolverState(z, jnp.zeros_like(z)))
  _, (zs, x0s) = jax.jit(lambda init, xs: jax.lax.scan(step, init, xs))(
      init, (eps, orders, schedule.alpha_bar, anchors, schedule.alpha_bar_prev))
  return np.asarray(zs), np.asarray(x0s)


def test_training_alphas_are_the_release_betas(release):
  np.testing.assert_allclose(schedules.release_alphas_cumprod(), release['alphas_cumprod'],
                             rtol=0, atol=1e-6)


@pytest.mark.parametrize('steps', STEPS)
@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_schedule_is_the_release_schedulers(release, solver, steps):
  key = f'{solver}_{steps}'
  s = schedules.release_schedule(steps, SOLVERS[solver])
  np.testing.assert_array_equal(np.asarray(s.timesteps), release[f'{key}_timesteps'])
  np.testing.assert_allclose(np.asarray(s.alpha_bar), release[f'{key}_alpha_bar'],
                             rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alpha_bar_prev), release[f'{key}_alpha_bar_prev'],
                             rtol=0, atol=1e-6)
  if solver == 'dpm':
    np.testing.assert_array_equal(np.asarray(s.orders), release[f'{key}_orders'])
  assert s.output == 'x0' and s.init_noise_sigma == 1.0


@pytest.mark.parametrize('steps', (25, 7, 1))
@pytest.mark.parametrize('solver', sorted(SOLVERS))
def test_solver_steps_are_the_release_schedulers(release, solver, steps):
  """The whole trajectory, fed the same model outputs: DPM-Solver's order-2 restarts,
  DDIM's final alpha 1 and DPM's last step to timestep 0 included."""
  key = f'{solver}_{steps}'
  zs, x0s = _trajectory(schedules.release_schedule(steps, SOLVERS[solver]),
                        jnp.asarray(release[f'{key}_z'][0]), jnp.asarray(release[f'{key}_eps']))
  scale = np.abs(release[f'{key}_z']).max()
  np.testing.assert_allclose(zs, release[f'{key}_z'][1:], rtol=0, atol=2e-6 * scale)
  np.testing.assert_allclose(x0s, release[f'{key}_x0'], rtol=0, atol=2e-6 * scale)


def test_the_solvers_differ_and_ddim_ends_on_x0(release):
  """DPM-Solver is not DDIM (a solver mix-up would pass the schedule test), and DDIM's
  last step lands on its x0 prediction (final alpha 1)."""
  assert np.abs(release['dpm_25_z'][-1] - release['ddim_25_z'][-1]).max() > 1e-2
  zs, x0s = _trajectory(schedules.release_schedule(25, 'ddim'),
                        jnp.asarray(release['dpm_25_z'][0]), jnp.asarray(release['dpm_25_eps']))
  assert np.abs(zs[-1] - release['dpm_25_z'][-1]).max() > 1e-2
  np.testing.assert_allclose(zs[-1], x0s[-1], atol=1e-6)


def test_sdxl_scheduler_config_is_not_the_release_schedule():
  """Why the release needs its own: SDXL's scheduler config ('leading', offset 1)."""
  ours = schedules.ddim_schedule(tiny_sdxl.SDXL_SCHEDULER_CONFIG, 25)
  release = schedules.release_schedule(25, 'ddim')
  assert int(ours.timesteps[0]) == 961 and int(release.timesteps[0]) == 999


@pytest.mark.parametrize('kwargs', [dict(num_steps=0), dict(num_steps=1001),
                                    dict(num_steps=25, solver='euler')])
def test_bad_release_schedules_are_refused(kwargs):
  with pytest.raises(ValueError):
    schedules.release_schedule(**kwargs)


def test_schedule_matches_diffusers_ddim():
  from diffusers import FlaxDDIMScheduler  # pylint: disable=g-import-not-at-top
  s = schedules.ddim_schedule(tiny.SCHEDULER_CONFIG, 4)
  np.testing.assert_array_equal(s.timesteps, [751, 501, 251, 1])
  # A DDIM update through the diffusers scheduler equals ours.
  sched = FlaxDDIMScheduler.from_config(
      {k: v for k, v in tiny.SCHEDULER_CONFIG.items() if k != '_class_name'})
  state = sched.set_timesteps(sched.create_state(), 4)
  z, eps = jnp.ones((1, 4, 2, 2)), jnp.full((1, 4, 2, 2), 0.3)
  for i in range(4):
    ref = sched.step(state, eps, state.timesteps[i], z).prev_sample
    ours, _ = schedules.ddim_step(z, eps, s.alpha_bar[i], s.alpha_bar_prev[i], s)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_a_bad_step_count_is_refused():
  with pytest.raises(ValueError, match='num_steps'):
    schedules.ddim_schedule(tiny.SCHEDULER_CONFIG, 0)


def test_one_noise_schedule_for_training_and_sampling():
  """Training noises with the abar the DDIM sampler steps with (one source)."""
  abar = schedules.alphas_cumprod(tiny.SCHEDULER_CONFIG)
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-6)
  s = schedules.ddim_schedule(tiny.SCHEDULER_CONFIG, 10)
  np.testing.assert_array_equal(np.asarray(s.alpha_bar), abar[np.asarray(s.timesteps)])
  linear = schedules.alphas_cumprod({**tiny.SCHEDULER_CONFIG, 'beta_schedule': 'linear'})
  assert not np.allclose(linear, abar)


@pytest.mark.parametrize('bad, message', [({'beta_schedule': 'cosine_typo'}, 'scheduler'),
                                          ({'prediction_type': 'flow'}, 'prediction_type')])
def test_unsupported_scheduler_configs_are_refused(bad, message):
  with pytest.raises(ValueError, match=message):
    schedules.alphas_cumprod({**tiny.SCHEDULER_CONFIG, **bad})
  with pytest.raises(ValueError, match=message):
    schedules.ddim_schedule({**tiny.SCHEDULER_CONFIG, **bad}, 4)
