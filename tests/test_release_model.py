"""The release's RealCustom model in our code, against the release's own UNet.

tests/fixtures/release_unet/ holds a tiny random SDXL-shaped UNet of the release
(`models/unet_2d_condition_custom.py`, image_prompt_mode 'naive'), its inputs and its
outputs (make_fixtures.py). Here the base goes through our diffusers loader and the
adapter through our converter (`release.convert_release_checkpoint`), then our model
(`release.model.ReleaseRealCustom`) runs on the same inputs.
"""
import json
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import model as model_lib
from realcustom_jax.release import convert as release
from realcustom_jax.release import model as release_model
from realcustom_jax.loading import weights
from realcustom_jax.attention import resize_scope
from realcustom_jax.unet import RealCustomUNet
from tests import release_unet_fixture as fixture
from tests.unet_configs import SD1_LIKE, SDXL_BASE

TOL = 1e-5  # float32, the bar for the release parity


def _run_once(fn, *args):
  """Compiles and runs `fn` once, with XLA's CPU backend optimisations off: each program
  here runs once, and they cost more than they save (the gradient: 9 s -> 6 s)."""
  compiled = jax.jit(fn).lower(*args).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return compiled(*args)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  pytest.importorskip('torch')  # the converter reads the release's pickle
  folder = tmp_path_factory.mktemp('release')
  unet_config, base = weights.load_unet(
      fixture.write_unet_dir(str(folder)), False, jnp.float32, sdxl=True)
  path = str(folder / 'adapter.safetensors')
  release.convert_release_checkpoint(fixture.CHECKPOINT, path, allow_pickle=True,
                                     unet_config=fixture.RELEASE_CONFIG)
  model = release.build_release_model(unet_config, adapter_lib.load_adapter_metadata(path))
  adapter, _ = release.load_release_adapter(path, model)
  adapter = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapter)
  z = fixture.data()
  inputs = (z['latents'], z['timesteps'], z['text'])
  kwargs = dict(added_cond={'text_embeds': z['text_embeds'], 'time_ids': z['time_ids']})
  return model, base, adapter, z, inputs, kwargs, path


@pytest.fixture(scope='module')
def subject_run(built):
  """One compile: the subject prediction (no mask) and its gradient w.r.t. the adapter."""
  model, base, adapter, z, inputs, kwargs, _ = built
  features = (z['global_features'], z['local_features'])
  target = jnp.asarray(z['latents'][::-1])

  def loss(a):
    eps = model.apply({'params': adapter_lib.merge_params({'unet': base}, a)}, *inputs,
                      features, **kwargs)
    return jnp.mean((eps - target) ** 2), eps
  (_, eps), grads = _run_once(jax.value_and_grad(loss, has_aux=True), adapter)
  return np.asarray(eps), grads


def test_subject_prediction_matches_the_release_unet(built, subject_run):
  z = built[3]
  eps, _ = subject_run
  diff = np.abs(eps - z['eps_subject']).max()
  print(f'release parity, subject without mask: {diff:.2e}')
  assert diff <= TOL, diff
  # The subject moves the release's output, so the check covers the visual branch.
  assert np.abs(z['eps_subject'] - z['eps_text']).max() > 0.1


def test_masked_prediction_matches_the_release_unet(built):
  """The mask is twice as fine as this UNet's attn2 layers: each resizes it by 1/2
  (what SDXL's quarter-latent layers do with the release's half-latent mask) and gates
  its visual output with it."""
  model, base, adapter, z, inputs, kwargs, _ = built
  params = adapter_lib.merge_params({'unet': base}, adapter)
  eps = _run_once(lambda p, m: model.apply(
      {'params': p}, *inputs, (z['global_features'], z['local_features']), scope_mask=m,
      **kwargs), params, z['mask'][:, 0])
  diff = np.abs(np.asarray(eps) - z['eps_mask']).max()
  print(f'release parity, subject with a mask: {diff:.2e}')
  assert diff <= TOL, diff
  assert np.abs(z['eps_mask'] - z['eps_subject']).max() > 0.1  # the mask gates


def test_text_only_prediction_and_word_maps_match_the_release(built):
  """The T2I pass of the release (no subject): its output, and each attn2's
  text->image map reduced as its mask generation does (head mean, target tokens)."""
  model, base, _, z, inputs, kwargs, _ = built
  words = np.zeros((2, z['text'].shape[1]), np.float32)
  words[0, 2] = words[1, 3:5] = 1.0
  eps, state = _run_once(lambda p: model.apply(
      {'params': p}, *inputs, word_weights=words, mutable=['intermediates'], **kwargs),
                         {'unet': base})
  diff = np.abs(np.asarray(eps) - z['eps_text']).max()
  print(f'release parity, text only: {diff:.2e}')
  assert diff <= TOL, diff
  layers = release.attn2_layers(model.unet)
  assert len(layers) == len([k for k in z if k.startswith('crossmap_')]) == 8
  for i, layer in enumerate(layers):  # the release lists its maps in this order
    ours = state['intermediates']
    for key in layer.path:
      ours = ours[key]
    want = np.einsum('bhnyx,bn->byx', z[f'crossmap_{i}'], words) / z[f'crossmap_{i}'].shape[1]
    np.testing.assert_allclose(np.asarray(ours['word_map'][0]), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize('case', ['up2', 'same', 'down2', 'grow', 'shrink'])
def test_scope_resize_is_the_release_mask_interpolation(case):
  """`attention.resize_scope` (size-based) = the release's `F.interpolate(mask,
  scale_factor=height / mask_height, mode='bilinear')` when both axes scale alike."""
  z = fixture.data()
  source, want = z[f'resize_{case}_in'][:, 0], z[f'resize_{case}_out'][:, 0]
  got = resize_scope(jnp.asarray(source), *want.shape[1:])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)


def test_release_adapter_is_a_learning_part(built, subject_run):
  """Every adapter leaf (each attn2's visual K/V, every projector tensor) gets gradient,
  and the adapter split holds exactly those."""
  model, base, adapter, _, _, _, _ = built
  _, grads = subject_run
  chex.assert_trees_all_equal_structs(grads, adapter)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(np.asarray(g)).max() > 0, jax.tree_util.keystr(path)
  n_kv = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(grads['unet']))
  assert n_kv == 2 * len(release.attn2_layers(model.unet))
  frozen, trainable = adapter_lib.split_params(
      adapter_lib.merge_params({'unet': base}, adapter))
  chex.assert_trees_all_equal_structs(trainable, adapter)
  assert 'subject_projector' not in frozen


def test_projector_matches_the_release_projector_per_reference(built):
  """The model's tokens are the release projector's; R reference subjects ((B, R, n, c)
  features) are projected one by one."""
  model, base, adapter, z, _, _, _ = built
  params = adapter_lib.merge_params({'unet': base}, adapter)
  g, l = z['global_features'], z['local_features']
  project = lambda m, *f: m.visual_tokens(
      None, None, f, sqrt_alpha_bar=None, gamma_num=1.0, scope_mask=None,
      token_priority=None, straight_through_selection=False)[0]
  tokens = jax.jit(lambda p, *f: model.apply({'params': p}, *f, method=project))(
      params, np.stack([g, g[::-1]], 1), np.stack([l, l[::-1]], 1))
  chex.assert_shape(tokens, (2, 2, g.shape[1], model.unet.cross_attention_dim))
  np.testing.assert_allclose(np.asarray(tokens[:, 0]), z['projected'], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(tokens[:, 1]), z['projected'][::-1], atol=TOL, rtol=0)


def test_release_adapter_is_refused_by_a_paper_model(built):
  path = built[-1]
  metadata = adapter_lib.load_adapter_metadata(path)
  assert metadata['adapter_kind'] == adapter_lib.RELEASE_KIND
  # What the paper pipeline checks (`pipeline._read_adapter`) and the full check.
  for check in (lambda: adapter_lib.check_layout(metadata['adapter_layout'], path),
                lambda: adapter_lib.check_adapter_metadata(metadata, path)):
    with pytest.raises(ValueError, match="released RealCustom_highres adapter") as e:
      check()
    assert '\n' not in str(e.value) and "projector='paper'" in str(e.value)


def test_paper_adapter_is_refused_by_the_release_model(built, tmp_path):
  model = built[0]
  path = str(tmp_path / 'paper.safetensors')
  adapter_lib.save_adapter(path, {'visual_proj': {'dense': {'kernel': np.zeros((2, 2))}}})
  with pytest.raises(ValueError, match='paper adapter') as e:
    release.load_release_adapter(path, model)
  assert '\n' not in str(e.value)


def test_converted_adapter_loads_without_torch(built, monkeypatch):
  _, _, adapter, _, _, _, path = built
  monkeypatch.setitem(sys.modules, 'torch', None)  # any `import torch` now fails
  params, metadata = release.load_release_adapter(path)
  chex.assert_trees_all_close(jax.tree.map(lambda x: np.asarray(x, np.float32), params),
                              jax.tree.map(np.asarray, adapter))
  assert json.loads(metadata['model_config']) == {
      'projector': 'release_highres', 'scoring': 'none', 'release_vision_dim': 32,
      'release_dim_head': fixture.DIM_HEAD}


def test_release_model_config_is_checked():
  check = release_model.check_release_model_config
  with pytest.raises(ValueError, match="scoring='none'"):
    check(dict(projector='release_highres', scoring='adaptive'))
  with pytest.raises(ValueError, match='release_vision_dim'):
    check(dict(projector='release_highres', scoring='none', release_vision_dim=100))
  with pytest.raises(ValueError, match='config.model.projector'):
    check(dict(projector='ip_adapter'))
  with pytest.raises(ValueError, match='config.model.dtype'):
    check(dict(dtype='float64'))  # the keys every family shares are checked too
  check(dict(projector='release_highres', scoring='none'))
  check({})  # the release's defaults
  # The paper's builder refuses the release's model (its family builds it).
  config = ml_collections.ConfigDict({'model': dict(projector='release_highres',
                                                    scoring='none')})
  with pytest.raises(ValueError, match='through its family'):
    model_lib.build_model(config, {})


def test_release_unet_config_is_sdxl_base_with_its_70_layers():
  """The library's copy of the release's UNet config is SDXL base 1.0's (tests'
  SDXL_BASE, every key diffusers writes), with the release's 70 attn2 layers."""
  for key, value in release.RELEASE_UNET_CONFIG.items():
    want = SDXL_BASE[key]
    assert value == (tuple(want) if isinstance(want, list) else want), key
  layers = release.attn2_layers(RealCustomUNet.from_config(SDXL_BASE))
  assert len(layers) == 70 and len({l.torch_prefix for l in layers}) == 70
  assert layers[0].torch_prefix == 'down_blocks.1.attentions.0.transformer_blocks.0.attn2'
  assert layers[-1].torch_prefix == 'up_blocks.1.attentions.2.transformer_blocks.1.attn2'
  assert {l.width for l in layers} == {640, 1280}
  sd1 = RealCustomUNet.from_config(SD1_LIKE)
  assert len(release.attn2_layers(sd1)) == sd1.num_cross_attention_layers
