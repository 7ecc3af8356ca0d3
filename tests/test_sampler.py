"""The RealCustom DDIM sampler (Sec. 3.3, Eqs. 11-13) on a tiny random model."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from realcustom_jax import model as model_lib
from realcustom_jax import mask_strategies
from realcustom_jax import sampler
from realcustom_jax import schedules
from realcustom_jax.loading import tiny
from realcustom_jax.unet import RealCustomUNet

B, N_TEXT, N_IMAGE, C_IMAGE, STEPS = 2, 7, 5, 12, 3
GAMMA_SCOPE = 0.3


def _conditions(x, **fields) -> sampler.Conditions:
  """The sampler's conditions from a test's inputs, with `fields` replaced."""
  cond = sampler.Conditions(text=x['text_emb'], uncond_text=x['uncond_emb'],
                            image=x['image_feats'], word_weights=x['word_weights'])
  return cond.replace(**fields)


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
  # Host-drawn weights of the traced shapes (a jitted init is a long compile on CPU).
  params = tiny.host_random_params(
      model_lib.param_shapes(model, (4, size, size), N_TEXT, N_IMAGE, C_IMAGE), seed=0)
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  c_t = unet.cross_attention_dim
  inputs = dict(
      latents=jax.random.normal(k[0], (B, 4, size, size)),
      text_emb=jax.random.normal(k[1], (B, N_TEXT, c_t)),
      uncond_emb=jnp.broadcast_to(jax.random.normal(k[2], (1, N_TEXT, c_t)), (B, N_TEXT, c_t)),
      image_feats=jax.random.normal(k[3], (B, N_IMAGE, C_IMAGE)),
      word_weights=jnp.zeros((B, N_TEXT)).at[:, 2].set(1.0).at[1, 3].set(1.0))
  schedule = schedules.ddim_schedule(tiny.SCHEDULER_CONFIG, STEPS)
  # One jitted trajectory sampler for the whole module, limited to a single trace.
  traj = sampler.build_sampler(model, return_trajectory=True, max_traces=1)
  return model, params, schedule, inputs, traj


def _run(setup, params=None, latents=None, w_t=7.5, w_i=12.5, g_scope=GAMMA_SCOPE, g_num=0.8):
  model, base_params, schedule, x, traj = setup
  settings = sampler.GuidanceSettings.create(w_t, w_i, g_scope, g_num)
  return traj(base_params if params is None else params, schedule,
              x['latents'] if latents is None else latents, _conditions(x), settings)


@pytest.fixture(scope='module')
def default_run(setup):
  return _run(setup)


@pytest.fixture(scope='module')
def cfg_latents(setup):
  model, params, schedule, x, _ = setup
  return sampler.cfg_sample(model, params, schedule, x['latents'], _conditions(x),
                            sampler.GuidanceSettings.create()).latents


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


def test_fused_attention_gives_the_same_scopes_and_samples(setup, default_run, cudnn_on_cpu):
  # Every layer on the 'cudnn' path, run by JAX's XLA kernel behind the same call on a
  # CPU: the T2I word maps then come out of the text kernel's widened heads
  # (`fused_attention_with_word_maps`), and scopes and latents must not move.
  model, params, schedule, x, _ = setup
  config = tiny_config.get_config()
  fused = model_lib.RealCustom(unet=RealCustomUNet.from_config(config.tiny.unet,
                                                               attention_impl='cudnn'))
  out = sampler.build_sampler(fused, return_trajectory=True)(
      params, schedule, x['latents'], _conditions(x),
      sampler.GuidanceSettings.create(gamma_scope=GAMMA_SCOPE))
  # Self and visual calls at the heads' width 16; the [uncond, T2I] text calls at 16 + 1
  # word column, rounded up to 24 (the TI2I call's text attention has no maps: 16).
  assert sorted({v.shape[-1] for _, _, _, v, _ in cudnn_on_cpu}) == [16, 24]
  np.testing.assert_array_equal(np.asarray(out.masks) > 0, np.asarray(default_run.masks) > 0)
  np.testing.assert_allclose(out.masks, default_run.masks, atol=1e-5)
  np.testing.assert_allclose(out.latents, default_run.latents, atol=1e-4, rtol=1e-4)


def test_binary_mask(setup):
  model, params, schedule, x, _ = setup
  settings = sampler.GuidanceSettings.create(gamma_scope=GAMMA_SCOPE, binary_mask=True)
  out = sampler.sample(model, params, schedule, x['latents'], _conditions(x),
                       settings=settings, return_trajectory=True)
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
  sampler.sample(model, params, schedule, x['latents'], _conditions(x),
                 settings=sampler.GuidanceSettings.create(guidance_text=2.0, gamma_num=0.5))
  n = fn._cache_size()  # pylint: disable=protected-access
  sampler.sample(model, params, schedule, x['latents'], _conditions(x),
                 settings=sampler.GuidanceSettings.create(
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
    sampler.sample(model, params, schedule, x['latents'], _conditions(x),
                   settings=(7.5, 12.5, 0.25, 0.8))


# ---------------------------------------------------------------------------------
# The release's mask strategies and mask reuse in the paper's loop (its guidance:
# test_release_sampler.py)
# ---------------------------------------------------------------------------------

# The release's usual mode (its scripts): max_norm with the self-map refinement.
RELEASE_MODE = ('max_norm', 'selfmap_min_max_per_channel')
REUSE_STEPS = 4  # the schedule of these tests (the module's STEPS is 3)
# The release's layout at toy size: no attention at the latent size, so that the
# release's mask resolution (half the latent, 4x4) has word and self-attention maps.
XL_SHAPED = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), block_out_channels=(32, 32),
    layers_per_block=1, attention_head_dim=(2, 2), cross_attention_dim=32)


def _count(jaxpr, primitive: str) -> int:
  """Uses of a primitive in a jaxpr and every jaxpr nested in it."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == primitive
    for sub in jax.core.jaxprs_in_params(eqn.params):
      count += _count(sub, primitive)
  return count


def _conv_count(jaxpr) -> int:
  """Convolutions: one UNet call is a fixed number of them."""
  return _count(jaxpr, 'conv_general_dilated')


def test_paper_reuse_keeps_the_t2i_call(setup):
  """Trace inspection: Eq. 13 reads eps_T2I at every step, so with paper guidance reuse
  only selects the carried scope; both UNet calls stay unconditional in the ONE scan.

  (Which steps reuse is `sampler.mask_is_fresh`, tested by running the release's loop in
  test_release_sampler.py.)
  """
  model, params, schedule, x, _ = setup
  loop = sampler._realcustom_loop  # pylint: disable=protected-access
  trace = lambda n: jax.make_jaxpr(functools.partial(loop, model, return_trajectory=False))(
      params, schedule, x['latents'], _conditions(x),
      sampler.GuidanceSettings.create(mask_reused_step=n)).jaxpr
  bodies = [[e for e in trace(n).eqns if e.primitive.name == 'scan'] for n in (None, 2)]
  assert [len(b) for b in bodies] == [1, 1]
  plain, reused = (b[0].params['jaxpr'].jaxpr for b in bodies)
  assert not [e for e in reused.eqns if e.primitive.name == 'cond']
  assert _conv_count(reused) == _conv_count(plain) > 0
  assert _count(reused, 'select_n') == _count(plain, 'select_n') + 1  # the scope's choice


def test_a_self_map_mode_needs_self_attention_at_the_mask_resolution():
  """A one-level UNet works at the latent size only: no self map at half of it."""
  model = model_lib.RealCustom(unet=RealCustomUNet.from_config(dict(
      XL_SHAPED, down_block_types=('CrossAttnDownBlock2D',),
      up_block_types=('CrossAttnUpBlock2D',), block_out_channels=(32,),
      attention_head_dim=(2,))))
  params = model_lib.param_shapes(model, (4, 8, 8), N_TEXT, N_IMAGE, C_IMAGE)
  schedule = schedules.ddim_schedule(tiny.SCHEDULER_CONFIG, REUSE_STEPS)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  x = dict(latents=spec(B, 4, 8, 8), text_emb=spec(B, N_TEXT, 32),
           uncond_emb=spec(B, N_TEXT, 32), image_feats=spec(B, N_IMAGE, C_IMAGE),
           word_weights=spec(B, N_TEXT))
  with pytest.raises(ValueError, match='self-attention layer at the mask resolution'):
    jax.eval_shape(sampler.build_sampler(model), params, schedule, x['latents'],
                   _conditions(x), sampler.GuidanceSettings.create(mask_strategy=RELEASE_MODE))


def test_self_map_modes_read_the_layers_at_the_mask_resolution():
  model = model_lib.RealCustom(unet=RealCustomUNet.from_config(XL_SHAPED))
  rng = np.random.default_rng(7)
  softmax = lambda a: np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  maps = [rng.uniform(size=(B, 8, 8)), rng.uniform(size=(B, 4, 4))]
  at_mask = softmax(rng.normal(size=(B, 2, 16, 16)) * 3)
  finer = softmax(rng.normal(size=(B, 2, 64, 64)))
  settings = sampler.GuidanceSettings.create(mask_strategy=RELEASE_MODE, gamma_scope=0.5)
  scope_fn = sampler.step_scope
  scopes = jax.jit(lambda maps, finer, at_mask: (
      scope_fn(model, settings, maps, [finer, at_mask], (4, 4)),
      mask_strategies.release_mask(maps, 0.5, (4, 4), RELEASE_MODE, [at_mask]),
      mask_strategies.release_mask(maps, 0.5, (4, 4), RELEASE_MODE)))
  scope, only_at_mask, unrefined = scopes(maps, finer, at_mask)
  np.testing.assert_array_equal(scope, only_at_mask)
  assert not np.allclose(scope, unrefined)


@pytest.mark.parametrize('overrides, message', [
    (dict(mask_strategy='max_nrom'), 'mask_strategy'),
    (dict(mask_strategy=['max_norm', 'crossmap_64']), 'mask_strategy'),
    (dict(mask_strategy=[]), 'mask_strategy'),
    (dict(gamma_scope=1.2, mask_strategy=['max_norm']), 'gamma_scope'),
    (dict(gamma_scope=-0.5, mask_strategy=['max_norm']), 'gamma_scope'),
    (dict(mask_reused_step=-1), 'mask_reused_step'),
    (dict(mask_reused_step=0), 'mask_reused_step'),
    (dict(mask_reused_step=2.5), 'mask_reused_step'),
    (dict(mask_reused_step=True), 'mask_reused_step'),
    (dict(binary_mask=True, mask_strategy=['max_norm']), 'binary'),
])
def test_bad_release_settings_are_refused_when_made(overrides, message):
  with pytest.raises(ValueError, match=message) as info:
    sampler.GuidanceSettings.create(**overrides)
  assert '\n' not in str(info.value)


def test_release_settings_from_config_and_their_static_parts():
  config = tiny_config.get_config()
  config.sampler.mask_strategy = ('binary', 'max_norm')  # any order: one canonical tuple
  config.sampler.mask_reused_step = 12
  s = sampler.GuidanceSettings.from_config(config.sampler)
  assert s.mask_strategy == ('max_norm', 'binary')
  leaves = jax.tree.leaves(s)
  assert len(leaves) == 5 and leaves[-1].dtype == jnp.int32 and int(leaves[-1]) == 12
  other = sampler.GuidanceSettings.from_config(config.sampler, mask_reused_step=3)
  assert jax.tree.structure(other) == jax.tree.structure(s)  # N is traced


def test_trajectory_reports_the_kept_tokens_and_a_priority_overrides_them(setup, default_run):
  model, params, schedule, x, _ = setup
  k = int(0.8 * N_IMAGE)
  selections = np.asarray(default_run.selections)
  assert selections.shape == (STEPS, B, N_IMAGE) and selections.dtype == bool
  assert np.all(selections.sum(-1) == k)
  # A fixed order (Conditions.token_priority): Eq. 10 keeps its top k at every step.
  priority = jnp.tile(jnp.arange(N_IMAGE, dtype=jnp.float32)[None], (B, 1))
  cond = _conditions(x).replace(token_priority=priority)
  out = sampler.sample(model, params, schedule, x['latents'], cond,
                       sampler.GuidanceSettings.create(gamma_scope=GAMMA_SCOPE),
                       return_trajectory=True)
  expected = np.arange(N_IMAGE) >= N_IMAGE - k
  assert np.all(np.asarray(out.selections) == expected)
  with pytest.raises(ValueError, match='token_priority'):
    sampler.sample(model, params, schedule, x['latents'],
                   cond.replace(token_priority=priority[:, :3]))
