"""The RealCustom DDIM sampler (Sec. 3.3, Eqs. 11-13) on a tiny random model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from realcustom_jax import model as model_lib
from realcustom_jax import sampler
from realcustom_jax import tiny
from realcustom_jax.unet import RealCustomUNet

B, N_TEXT, N_IMAGE, C_IMAGE, STEPS = 2, 7, 5, 12, 3
GAMMA_SCOPE = 0.3


def _set_visual_kv(params, value):
  def visit(path, leaf):
    names = [getattr(p, 'key', '') for p in path]
    hit = any(n in ('to_k_visual', 'to_v_visual') for n in names)
    return jnp.full_like(leaf, value) if hit else leaf
  return jax.tree_util.tree_map_with_path(visit, params)


@pytest.fixture(scope='module')
def setup():
  config = tiny_config.get_config()
  unet = RealCustomUNet.from_config(config.tiny.unet)
  model = model_lib.RealCustom(unet=unet)
  size = config.tiny.unet['sample_size']
  params = model_lib.init_params(model, jax.random.PRNGKey(0), (4, size, size), N_TEXT,
                                 N_IMAGE, C_IMAGE)
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  c_t = unet.cross_attention_dim
  inputs = dict(
      latents=jax.random.normal(k[0], (B, 4, size, size)),
      text_emb=jax.random.normal(k[1], (B, N_TEXT, c_t)),
      uncond_emb=jnp.broadcast_to(jax.random.normal(k[2], (1, N_TEXT, c_t)), (B, N_TEXT, c_t)),
      image_feats=jax.random.normal(k[3], (B, N_IMAGE, C_IMAGE)),
      word_weights=jnp.zeros((B, N_TEXT)).at[:, 2].set(1.0).at[1, 3].set(1.0))
  schedule = sampler.ddim_schedule(tiny.SCHEDULER_CONFIG, STEPS)
  # One jitted trajectory sampler for the whole module, limited to a single trace.
  traj = sampler.build_sampler(model, return_trajectory=True, max_traces=1)
  return model, params, schedule, inputs, traj


def _run(setup, params=None, latents=None, w_t=7.5, w_i=12.5, g_scope=GAMMA_SCOPE, g_num=0.8):
  model, base_params, schedule, x, traj = setup
  settings = sampler.GuidanceSettings.create(w_t, w_i, g_scope, g_num)
  return traj(base_params if params is None else params, schedule,
              x['latents'] if latents is None else latents, x['text_emb'], x['uncond_emb'],
              x['image_feats'], x['word_weights'], settings)


@pytest.fixture(scope='module')
def default_run(setup):
  return _run(setup)


@pytest.fixture(scope='module')
def cfg_latents(setup):
  model, params, schedule, x, _ = setup
  return sampler.cfg_sample(model, params, schedule, x['latents'], x['text_emb'],
                            x['uncond_emb'], sampler.GuidanceSettings.create()).latents


def test_schedule_matches_diffusers_ddim():
  from diffusers import FlaxDDIMScheduler  # pylint: disable=g-import-not-at-top
  s = sampler.ddim_schedule(tiny.SCHEDULER_CONFIG, 4)
  np.testing.assert_array_equal(s.timesteps, [751, 501, 251, 1])
  # A DDIM update through the diffusers scheduler equals ours.
  sched = FlaxDDIMScheduler.from_config(
      {k: v for k, v in tiny.SCHEDULER_CONFIG.items() if k != '_class_name'})
  state = sched.set_timesteps(sched.create_state(), 4)
  z, eps = jnp.ones((1, 4, 2, 2)), jnp.full((1, 4, 2, 2), 0.3)
  for i in range(4):
    ref = sched.step(state, eps, state.timesteps[i], z).prev_sample
    ours, _ = sampler.ddim_step(z, eps, s.alpha_bar[i], s.alpha_bar_prev[i], s)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_adaptive_mask_guidance_is_eq13():
  e_u, e_t, e_i = jnp.float32(1.0), jnp.float32(2.0), jnp.float32(4.0)
  # 1 + 7.5 (2 - 1) + 12.5 (4 - 2) = 33.5
  assert float(sampler.adaptive_mask_guidance(e_u, e_t, e_i, 7.5, 12.5)) == 33.5


def test_no_image_guidance_equals_cfg(setup, cfg_latents):
  out = _run(setup, w_i=0.0)
  np.testing.assert_allclose(out.latents, cfg_latents, atol=1e-5, rtol=0)
  assert np.all(np.isfinite(out.latents))


def test_zero_visual_kv_equals_cfg(setup, cfg_latents, default_run):
  zero_kv = _set_visual_kv(setup[1], 0.0)
  out = _run(setup, params=zero_kv)  # w_i = 12.5
  # TI2I runs at batch B and T2I at 2B, so XLA's float32 rounding differs slightly and
  # w_i = 12.5 amplifies it: compare relative to the latents' scale (~10 here).
  scale = float(np.max(np.abs(cfg_latents)))
  np.testing.assert_allclose(out.latents, cfg_latents, atol=1e-5 * scale, rtol=0)
  # ...and with the real visual K/V the subject does change the result.
  assert np.max(np.abs(default_run.latents - cfg_latents)) > 1e-3


def test_soft_mask_at_every_step(setup, default_run):
  masks = np.asarray(default_run.masks)
  steps, b, h, w = masks.shape
  assert (steps, b) == (STEPS, B)
  k = int(GAMMA_SCOPE * h * w)
  for s in range(steps):
    for i in range(b):
      assert np.count_nonzero(masks[s, i]) == k, (s, i)
      assert masks[s, i].max() == pytest.approx(1.0)
      assert masks[s, i].min() >= 0.0
  # Soft values survive inside the scope (not a binary mask).
  assert np.any((masks > 0) & (masks < 1))
  np.testing.assert_array_equal(default_run.mask, masks[-1])
  assert default_run.x0.shape == (STEPS,) + setup[3]['latents'].shape


def test_binary_mask(setup):
  model, params, schedule, x, _ = setup
  settings = sampler.GuidanceSettings.create(gamma_scope=GAMMA_SCOPE, binary_mask=True)
  out = sampler.sample(model, params, schedule, **x, settings=settings,
                       return_trajectory=True)
  masks = np.asarray(out.masks)
  assert set(np.unique(masks)) == {0.0, 1.0}
  k = int(GAMMA_SCOPE * masks.shape[2] * masks.shape[3])
  assert np.all(np.count_nonzero(masks, axis=(2, 3)) == k)


def test_seed_determinism(setup, default_run):
  size = setup[3]['latents'].shape
  again = _run(setup)
  np.testing.assert_array_equal(again.latents, default_run.latents)
  other = _run(setup, latents=jax.random.normal(jax.random.PRNGKey(99), size))
  assert np.max(np.abs(other.latents - default_run.latents)) > 1e-2


def test_changing_scales_and_gammas_does_not_retrace(setup, default_run):
  # `traj` was built with max_traces=1 and has already traced once: any retrace raises.
  a = _run(setup, w_t=3.0, w_i=5.0, g_scope=0.5, g_num=0.4)
  b = _run(setup, w_t=7.5, w_i=12.5, g_scope=0.75, g_num=1.0)
  assert not np.allclose(a.latents, b.latents)
  assert np.count_nonzero(b.masks[0, 0]) == int(0.75 * b.masks.shape[2] * b.masks.shape[3])


def test_public_sample_does_not_retrace(setup):
  model, params, schedule, x, _ = setup
  fn = sampler.cached_sampler(model, False)
  sampler.sample(model, params, schedule, **x,
                 settings=sampler.GuidanceSettings.create(guidance_text=2.0, gamma_num=0.5))
  n = fn._cache_size()  # pylint: disable=protected-access
  sampler.sample(model, params, schedule, **x, settings=sampler.GuidanceSettings.create(
      guidance_text=9.0, guidance_image=1, gamma_scope=0.1, gamma_num=0.9))
  assert fn._cache_size() == n  # pylint: disable=protected-access


def test_settings_from_config_take_overrides_and_stay_one_pytree():
  config = tiny_config.get_config()
  config.sampler.gamma_scope = 0.4
  s = sampler.GuidanceSettings.from_config(config.sampler, guidance_image=3.0, gamma_num=None)
  assert (float(s.guidance_text), float(s.guidance_image), float(s.gamma_scope),
          float(s.gamma_num)) == pytest.approx((7.5, 3.0, 0.4, 0.8))
  assert s.binary_mask is False
  # Four traced float32 leaves; the binary flag is static (in the tree structure).
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 4 and all(l.dtype == jnp.float32 and l.shape == () for l in leaves)
  binary = sampler.GuidanceSettings.from_config(config.sampler, binary_mask=True)
  assert jax.tree.structure(binary) != jax.tree.structure(s)


@pytest.mark.parametrize('name,value', [('gamma_scope', 1.5), ('gamma_scope', -0.1),
                                        ('gamma_num', 2.0), ('gamma_num', float('nan')),
                                        ('guidance_text', float('inf')),
                                        ('guidance_image', [1.0, 2.0])])
def test_bad_settings_are_refused_when_made(name, value):
  with pytest.raises(ValueError, match=name):
    sampler.GuidanceSettings.create(**{name: value})


def test_sample_wants_guidance_settings(setup):
  model, params, schedule, x, _ = setup
  with pytest.raises(ValueError, match='GuidanceSettings'):
    sampler.sample(model, params, schedule, **x, settings=(7.5, 12.5, 0.25, 0.8))


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match='num_steps'):
    sampler.ddim_schedule(tiny.SCHEDULER_CONFIG, 0)


def test_one_noise_schedule_for_training_and_sampling():
  """Training noises with the abar the DDIM sampler steps with (one source)."""
  abar = sampler.alphas_cumprod(tiny.SCHEDULER_CONFIG)
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
  np.testing.assert_allclose(abar, np.cumprod(1 - betas), rtol=1e-6)
  s = sampler.ddim_schedule(tiny.SCHEDULER_CONFIG, 10)
  np.testing.assert_array_equal(np.asarray(s.alpha_bar), abar[np.asarray(s.timesteps)])
  linear = sampler.alphas_cumprod({**tiny.SCHEDULER_CONFIG, 'beta_schedule': 'linear'})
  assert not np.allclose(linear, abar)


@pytest.mark.parametrize('bad, message', [({'beta_schedule': 'cosine_typo'}, 'scheduler'),
                                          ({'prediction_type': 'flow'}, 'prediction_type')])
def test_unsupported_scheduler_configs_are_refused(bad, message):
  with pytest.raises(ValueError, match=message):
    sampler.alphas_cumprod({**tiny.SCHEDULER_CONFIG, **bad})
  with pytest.raises(ValueError, match=message):
    sampler.ddim_schedule({**tiny.SCHEDULER_CONFIG, **bad}, 4)
