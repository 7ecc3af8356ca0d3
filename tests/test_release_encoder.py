"""The release's subject encoder and projector (realcustom_jax/release/encoder.py).

Compared with the outputs of the release's own `ShallowDeepPatchfySiglipDinoEncoder` and
`ProjectorHighResMinAttn` on small random models, stored in
tests/fixtures/release_encoder/ by its make_fixtures.py.
"""
import json
import os
import shutil

import chex
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from realcustom_jax.release import encoder as release_encoder
from realcustom_jax.loading import weights

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'release_encoder')
PROJECTOR_FILE = os.path.join(FIXTURES, 'projector.safetensors')


@pytest.fixture(scope='module')
def ref():
  with open(os.path.join(FIXTURES, 'settings.json')) as f:
    settings = json.load(f)
  out = dict(np.load(os.path.join(FIXTURES, 'release_outputs.npz')))
  divisors = out['image_divisors'][:, None, None, None]
  # The exact float32 pixels the release was given (NHWC here, NCHW there).
  out['image'] = out['image_levels'].astype(np.float32) / divisors
  return settings, out


@pytest.fixture(scope='module')
def encoded(ref):
  settings, out = ref
  loaded = release_encoder.load_subject_encoder(
      FIXTURES, image_size=settings['image_size'],
      siglip_layers=settings['siglip_layers'], dino_layers=settings['dino_layers'],
      patchify_scale=settings['patchify_scale'])
  apply = chex.assert_max_traces(n=1)(
      lambda p, x: loaded.module.apply({'params': p}, x))
  encode = jax.jit(apply)
  features = encode(loaded.params, out['image'])
  encode(loaded.params, out['image'] + 0.0)  # same shapes: no second trace
  return loaded, features


def test_views_match_the_release_bit_for_bit(ref):
  settings, out = ref
  views = jax.jit(release_encoder.reference_views, static_argnums=(1, 2))(
      out['image'], settings['image_size'], settings['patchify_scale'])
  assert views.dtype == jnp.uint8
  diff = np.asarray(views).astype(int) - out['views']
  # Global views: torch's float32 bilinear (fused multiply-adds) then trunc(x * 255);
  # one ulp elsewhere would move pixels of the flat 8-bit regions by one level.
  assert not np.any(diff), (
      f'{np.count_nonzero(diff)} of {diff.size} view pixels differ (max {np.abs(diff).max()} '
      'levels): the bilinear resize no longer rounds as torch does')


def test_encoder_matches_the_release(ref, encoded):
  settings, out = ref
  loaded, (glob, local) = encoded
  b, grid = len(out['image']), settings['image_size'] // 14
  dim = settings['siglip_dim'] + settings['dino_dim']
  chex.assert_shape(glob, (b, grid * grid, dim))
  chex.assert_shape(local, (b, grid * grid * settings['patchify_scale'] ** 2, dim))
  assert loaded.feature_dim == dim
  np.testing.assert_allclose(np.asarray(glob), out['global_features'], rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(local), out['local_features'], rtol=0, atol=1e-5)


def test_projector_matches_the_release(ref, encoded):
  settings, out = ref
  projector, params = release_encoder.projector_from_torch_state(
      safetensors.numpy.load_file(PROJECTOR_FILE), dim_head=settings['projector']['dim_head'])
  assert (projector.vision_dim, projector.out_dim) == (
      settings['projector']['vision_dim'], settings['projector']['out_dim'])
  project = jax.jit(lambda p, g, l: projector.apply({'params': p}, g, l))
  # On the release's own features, and chained after our encoder.
  for glob, local in ((out['global_features'], out['local_features']), encoded[1]):
    got = project(params, glob, local)
    chex.assert_shape(got, out['projected'].shape)
    np.testing.assert_allclose(np.asarray(got), out['projected'], rtol=0, atol=1e-5)
  # Queries come from norm1 (global), keys / values from norm2 (local): swapped, the
  # output moves far beyond the tolerance.
  swapped = flax.core.unfreeze(params)
  attn = swapped['min_attention']
  attn['norm1'], attn['norm2'] = attn['norm2'], attn['norm1']
  moved = project(swapped, out['global_features'], out['local_features'])
  assert np.abs(np.asarray(moved) - out['projected']).max() > 1e-2


def test_projector_is_trainable(ref):
  _, out = ref
  projector, params = release_encoder.projector_from_torch_state(
      safetensors.numpy.load_file(PROJECTOR_FILE), dim_head=16)
  glob, local = out['global_features'], out['local_features']
  target = np.random.default_rng(0).standard_normal(out['projected'].shape).astype(np.float32)
  loss = lambda p: jnp.mean((projector.apply({'params': p}, glob, local) - target) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  flat = traverse_util.flatten_dict(grads)
  # Every tensor of the release's state dict is a parameter here, and all of them learn.
  assert len(flat) == len(safetensors.numpy.load_file(PROJECTOR_FILE))
  for path, g in flat.items():
    assert np.abs(np.asarray(g)).max() > 0, f'no gradient reaches {"/".join(path)}'


def test_local_views_are_pixel_strided_and_tokens_interleave():
  b, s, scale = 2, 3, 2
  image = np.arange(b * (s * scale) ** 2 * 3, dtype=np.float32).reshape(
      b, s * scale, s * scale, 3)
  views = np.asarray(jax.jit(release_encoder.local_views, static_argnums=1)(image, scale))
  chex.assert_shape(views, (b * scale * scale, s, s, 3))
  for i in range(b):
    for hp in range(scale):
      for wp in range(scale):
        np.testing.assert_array_equal(views[(i * scale + hp) * scale + wp],
                                      image[i, hp::scale, wp::scale])
  tokens = np.arange(b * scale * scale * 5, dtype=np.float32).reshape(-1, 5, 1)
  merged = np.asarray(jax.jit(release_encoder.interleave_local_tokens, static_argnums=(1, 2))(
      tokens, b, scale))
  # Token l of the four views of one image sit side by side.
  np.testing.assert_array_equal(merged[1, 4 * 2:4 * 3, 0], tokens[4:8, 2, 0])


def test_to_uint8_truncates_like_to_pil_image():
  levels = np.arange(256, dtype=np.float32)
  x = np.concatenate([levels / np.float32(255), levels / np.float32(256),
                      np.array([0.9999, 1.0, 1.5, -0.001, -0.5], np.float32)])
  got = np.asarray(jax.jit(release_encoder.to_uint8)(x))
  want = np.clip(np.trunc(x * np.float32(255)), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(got, want)
  assert got[-5:].tolist() == [254, 255, 255, 0, 0]  # no rounding; clipped out of range


def test_global_view_is_align_corners_bilinear():
  # Corners map onto corners and a linear ramp stays linear (align_corners=True).
  ramp = np.tile(np.linspace(0.0, 1.0, 9, dtype=np.float32)[None, None, :, None],
                 (1, 9, 1, 1))
  out = jax.jit(release_encoder.resize_bilinear_align_corners, static_argnums=1)(ramp, 5)
  np.testing.assert_allclose(np.asarray(out[0, 0, :, 0]), np.linspace(0, 1, 5), atol=1e-7)


def test_wrong_reference_size_is_refused(ref, encoded):
  settings, out = ref
  loaded, _ = encoded
  side = settings['image_size'] * settings['patchify_scale']
  for shape in ((1, side - 2, side - 2, 3), (1, side, side, 4), (side, side, 3)):
    with pytest.raises(ValueError, match='reference images must be'):
      loaded.module.apply({'params': loaded.params}, np.zeros(shape, np.float32))


def test_missing_encoder_files_give_one_line_errors(tmp_path):
  with pytest.raises(weights.CheckpointError, match='does not exist'):
    release_encoder.load_subject_encoder(tmp_path / 'nowhere')
  shutil.copytree(os.path.join(FIXTURES, release_encoder.SIGLIP_DIR),
                  tmp_path / release_encoder.SIGLIP_DIR)
  with pytest.raises(weights.CheckpointError, match='no vit_large_patch14_reg4_dinov2') as err:
    release_encoder.load_subject_encoder(tmp_path, image_size=76)
  assert '\n' not in str(err.value)
  with pytest.raises(weights.CheckpointError, match='out of range'):
    release_encoder.load_subject_encoder(FIXTURES, image_size=76)  # the release's 25 / 22


def test_bad_projector_states_give_one_line_errors():
  state = safetensors.numpy.load_file(PROJECTOR_FILE)
  with pytest.raises(weights.CheckpointError, match='multiple of dim_head'):
    release_encoder.projector_from_torch_state(state, dim_head=48)
  cut = dict(state, **{'min_attention.to_k.weight': state['min_attention.to_k.weight'][:-1]})
  with pytest.raises(weights.CheckpointError, match='has shape'):
    release_encoder.projector_from_torch_state(cut, dim_head=16)
  partial = {k: v for k, v in state.items() if k != 'projector.4.bias'}
  with pytest.raises(weights.CheckpointError, match='lacks projector.4.bias'):
    release_encoder.projector_from_torch_state(partial, dim_head=16)
  # The release's UNet checkpoint nests it under a prefix; other keys are not its business.
  prefixed = {release_encoder.RELEASE_PROJECTOR_PREFIX + k: v for k, v in state.items()}
  prefixed['down_blocks.0.weight'] = np.zeros(3, np.float32)
  module, params = release_encoder.projector_from_torch_state(
      prefixed, dim_head=16, prefix=release_encoder.RELEASE_PROJECTOR_PREFIX)
  assert module.out_dim == state['projector_base.weight'].shape[0]
  extra = dict(state, **{'projector.6.weight': np.zeros(3, np.float32)})
  with pytest.raises(weights.CheckpointError, match='unexpected'):
    release_encoder.projector_from_torch_state(extra, dim_head=16)
