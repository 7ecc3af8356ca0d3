"""The release's sampling loop (`realcustom_jax.release.sampler`): its two-branch guidance
with the negative image, the mask pass skipped under reuse, several references, SDXL's
added conditioning; on tiny random models of the release's layout."""
import functools
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realcustom_jax import model as model_lib
from realcustom_jax import sampler
from realcustom_jax import schedules
from realcustom_jax.loading import tiny
from realcustom_jax.release import model as release_model
from realcustom_jax.release import sampler as release_sampler
from realcustom_jax.unet import RealCustomUNet
from tests.test_sampler import B, C_IMAGE, N_IMAGE, N_TEXT, RELEASE_MODE, REUSE_STEPS
from tests.test_sampler import XL_SHAPED, _conditions, _conv_count


class ReleaseSetup(NamedTuple):
  model: model_lib.RealCustom
  run: Callable  # (settings, uncond_image=neg_image) -> (SampleOutput, mask passes run)
  args: tuple    # the sampler's arguments before the settings
  neg_image: jax.Array
  inputs: dict


def _release_settings(**overrides):
  values = dict(guidance_image=3.5, gamma_scope=0.25, mask_strategy=RELEASE_MODE,
                mask_reused_step=2)
  values.update(overrides)
  return sampler.GuidanceSettings.create(**values)


@pytest.fixture(scope='module')
def release_setup():
  """A release-mode sampler with traced reuse whose T2I mask passes are counted.

  While it traces, the sampler's attention-map call (the T2I mask pass's UNet call; the
  release step makes no other) is wrapped to fire a host callback at run time, so a
  pass skipped by the scan's `lax.cond` never counts.
  """
  model = model_lib.RealCustom(unet=RealCustomUNet.from_config(XL_SHAPED))
  params = tiny.host_random_params(
      model_lib.param_shapes(model, (4, 8, 8), N_TEXT, N_IMAGE, C_IMAGE), seed=3)
  rng = np.random.default_rng(4)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  x = dict(latents=normal(B, 4, 8, 8), text_emb=normal(B, N_TEXT, 32),
           uncond_emb=normal(B, N_TEXT, 32), image_feats=normal(B, N_IMAGE, C_IMAGE),
           word_weights=jnp.zeros((B, N_TEXT)).at[:, 2].set(1.0).at[1, 3].set(1.0))
  neg_image = normal(B, N_IMAGE, C_IMAGE)
  schedule = schedules.ddim_schedule(tiny.SCHEDULER_CONFIG, REUSE_STEPS)
  passes = []
  original = sampler.attention_maps

  def counted(*args, **kwargs):
    jax.debug.callback(lambda: passes.append(1))
    return original(*args, **kwargs)

  fn = release_sampler.build_sampler(model, return_trajectory=True, max_traces=1)
  args = (params, schedule, x['latents'])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sampler, 'attention_maps', counted)
    fn(*args, _conditions(x, uncond_image=neg_image), _release_settings())  # the one trace
  jax.effects_barrier()

  def run(settings, uncond_image=neg_image):
    passes.clear()
    out = fn(*args, _conditions(x, uncond_image=uncond_image), settings)
    jax.effects_barrier()
    return out, len(passes)

  return ReleaseSetup(model, run, args, neg_image, x)


def test_release_reuse_skips_the_mask_pass_after_step_n(release_setup):
  run = release_setup.run
  out, passes = run(_release_settings(mask_reused_step=2))
  assert passes == 2  # steps 0 and 1 only; steps 2 and 3 reuse step 1's mask
  masks = np.asarray(out.masks)
  np.testing.assert_array_equal(masks[2], masks[1])
  np.testing.assert_array_equal(masks[3], masks[1])
  assert not np.array_equal(masks[0], masks[1])  # step 1 did compute a new mask
  # N is traced: another N reuses the same executable (max_traces=1) and moves the cut.
  out1, passes1 = run(_release_settings(mask_reused_step=1))
  assert passes1 == 1
  np.testing.assert_array_equal(out1.masks[3], out1.masks[0])
  assert not np.allclose(out1.latents, out.latents)


def test_release_masks_follow_the_release_mode_and_traced_scope(release_setup):
  run = release_setup.run
  out, _ = run(_release_settings(gamma_scope=0.5))
  masks = np.asarray(out.masks)
  chex.assert_shape(masks, (REUSE_STEPS, B, 4, 4))  # half the 8x8 latent, as the release
  assert np.all(np.count_nonzero(masks, axis=(2, 3)) == 8)  # int(0.5 * 16)
  np.testing.assert_allclose(masks.max(axis=(2, 3)), 1.0, rtol=1e-5)  # max_norm
  assert np.any((masks > 0) & (masks < 1))  # soft: not 'binary'
  quarter, _ = run(_release_settings(gamma_scope=0.25))  # no retrace (max_traces=1)
  assert np.all(np.count_nonzero(quarter.masks, axis=(2, 3)) == 4)


def test_release_reuse_from_the_last_step_on_equals_no_reuse(release_setup):
  model, run, args, neg_image, x = release_setup
  plain = release_sampler.build_sampler(model, return_trajectory=True)(
      *args, _conditions(x, uncond_image=neg_image), _release_settings(mask_reused_step=None))
  for n in (REUSE_STEPS, 99):
    out, passes = run(_release_settings(mask_reused_step=n))
    assert passes == REUSE_STEPS
    np.testing.assert_allclose(out.latents, plain.latents, atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.masks, plain.masks, atol=1e-6, rtol=0)


def test_release_guidance_uses_the_negative_image(release_setup):
  run, neg_image = release_setup.run, release_setup.neg_image
  a, _ = run(_release_settings())
  b, _ = run(_release_settings(), uncond_image=neg_image * 0.0)
  assert np.max(np.abs(a.latents - b.latents)) > 1e-3


def test_reuse_is_a_branch_of_one_scan_holding_the_only_mask_pass(release_setup):
  """Trace inspection: with reuse the T2I pass sits in a cond branch of the ONE scan.

  One UNet call is a fixed number c of convolutions. The release step holds 2c: c in
  the body (the batched [uncond, TI2I] call) and c in one branch of the cond (the mask
  pass), the other branch (reuse) holding none.
  """
  model, _, args, neg_image, x = release_setup
  loop = release_sampler._release_loop  # pylint: disable=protected-access
  fn = functools.partial(loop, model, return_trajectory=False)
  trace = jax.make_jaxpr(fn)(*args, _conditions(x, uncond_image=neg_image), _release_settings())
  scans = [e for e in trace.jaxpr.eqns if e.primitive.name == 'scan']
  assert len(scans) == 1
  body = scans[0].params['jaxpr'].jaxpr
  conds = [e for e in body.eqns if e.primitive.name == 'cond']
  assert len(conds) == 1
  reuse, compute = sorted(_conv_count(b.jaxpr) for b in conds[0].params['branches'])
  assert reuse == 0 and compute > 0
  assert _conv_count(body) == 2 * compute  # the other UNet call is outside the cond


def test_release_guidance_needs_the_negative_image(release_setup):
  model, _, args, _, x = release_setup
  settings = _release_settings()
  with pytest.raises(ValueError, match='uncond_image'):
    release_sampler.sample(model, *args, _conditions(x), settings=settings)
  with pytest.raises(ValueError, match='uncond_image'):
    release_sampler.sample(model, *args, _conditions(x, uncond_image=x['image_feats'][:1]),
                   settings=settings)


def test_the_release_model_on_sdxl_traces_with_two_references(release_setup):
  """The released model's inputs reach every call: SDXL's added conditioning (negative
  pooled embedding for the unconditional rows), the encoder's (global, local) pair, and
  two reference subjects with one word each, which get one mask each."""
  pooled = 20  # SDXL's added conditioning at toy size (SDXL: 1280 + 6 * 256 = 2816)
  unet = RealCustomUNet.from_config(dict(
      XL_SHAPED, use_linear_projection=True, addition_embed_type='text_time',
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=pooled + 6 * 8))
  model = release_model.ReleaseRealCustom(unet=unet, release_vision_dim=16, release_dim_head=8)
  params = model_lib.param_shapes(model, (4, 8, 8), N_TEXT, N_IMAGE, 16)
  schedule, x = release_setup.args[1], dict(release_setup.inputs)
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  pair = lambda refs: tuple(spec(B, *refs, n, 16) for n in (N_IMAGE, 9))
  cond = lambda: {'text_embeds': spec(B, pooled), 'time_ids': spec(B, 6)}
  fn = release_sampler.build_sampler(model, return_trajectory=True)
  two = _conditions(x, image=pair((2,)), word_weights=spec(B, 2, N_TEXT),
                    uncond_image=pair((2,)), added=cond(), uncond_added=cond())
  out = jax.eval_shape(fn, params, schedule, x['latents'], two, _release_settings())
  assert out.masks.shape == (REUSE_STEPS, B, 2, 4, 4) and out.latents.shape == (B, 4, 8, 8)
  with pytest.raises(ValueError, match='several reference subjects'):
    jax.eval_shape(fn, params, schedule, x['latents'], two,
                   _release_settings(mask_strategy='paper'))
  # sample() asks for added_cond exactly where the UNet needs it.
  with pytest.raises(ValueError, match='added_cond'):
    release_sampler.sample(model, params, schedule, x['latents'],
                   _conditions(x, image=pair(()), uncond_image=pair(())),
                   settings=_release_settings())
  with pytest.raises(ValueError, match='added_cond'):
    release_sampler.sample(release_setup.model, *release_setup.args,
                   _conditions(x, uncond_image=release_setup.neg_image, added=cond()),
                   settings=_release_settings())


def test_a_second_reference_without_its_word_adds_nothing(release_setup):
  """Several subjects through `sample` (the release's multi-reference path): each gets
  its own mask from its own word weights, so a second reference whose word weights are
  all zero gets an all-zero mask and leaves the single-reference result unchanged."""
  model = release_model.ReleaseRealCustom(unet=RealCustomUNet.from_config(XL_SHAPED),
                                          release_vision_dim=16, release_dim_head=8)
  params = tiny.host_random_params(model_lib.param_shapes(model, (4, 8, 8), N_TEXT, N_IMAGE, 16),
                                   seed=5)
  rng = np.random.default_rng(6)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  one, other = ((normal(B, N_IMAGE, 16), normal(B, 9, 16)) for _ in range(2))
  neg, neg_other = ((normal(B, N_IMAGE, 16), normal(B, 9, 16)) for _ in range(2))
  both = lambda a, b: tuple(jnp.stack([x, y], axis=1) for x, y in zip(a, b))
  x = dict(release_setup.inputs)
  schedule = release_setup.args[1]
  settings = _release_settings(mask_strategy=('max_norm',), mask_reused_step=None)
  z = x['latents']
  single = release_sampler.sample(model, params, schedule, z, _conditions(x, image=one, uncond_image=neg),
                          settings=settings)
  weights = jnp.stack([x['word_weights'], jnp.zeros_like(x['word_weights'])], axis=1)
  double = release_sampler.sample(model, params, schedule, z, _conditions(
      x, image=both(one, other), word_weights=weights, uncond_image=both(neg, neg_other)),
                          settings=settings)
  # Equal up to float32 rounding (the R axis changes the reduction order).
  np.testing.assert_allclose(double.latents, single.latents, atol=1e-4, rtol=0)
  # The second reference matters once its word is there.
  weights = jnp.stack([x['word_weights']] * 2, axis=1)
  with_word = release_sampler.sample(model, params, schedule, z, _conditions(
      x, image=both(one, other), word_weights=weights, uncond_image=both(neg, neg_other)),
                             settings=settings)
  assert np.abs(np.asarray(with_word.latents) - np.asarray(single.latents)).max() > 1e-3
  with pytest.raises(ValueError, match='R=2'):
    release_sampler.sample(model, params, schedule, z, _conditions(
        x, image=both(one, other), uncond_image=both(neg, neg_other)), settings=settings)
