"""timm ViTs in Flax (realcustom_jax/release/vit.py) against timm itself.

The reference numbers come from tests/fixtures/release_encoder/ (made by its
make_fixtures.py with timm 1.0.31 and the release's own encoder): small random ViTs with
the flags of SigLIP so400m and DINOv2-L reg4, saved in timm's safetensors layout.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
from realcustom_jax.release import vit
from realcustom_jax.loading import weights

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'release_encoder')
SIGLIP = 'vit_so400m_patch14_siglip_384'
DINO = 'vit_large_patch14_reg4_dinov2.lvd142m'


@pytest.fixture(scope='module')
def loaded(ref):
  settings, _ = ref
  return {name: vit.load_vit(os.path.join(FIXTURES, name), settings['image_size'])
          for name in (SIGLIP, DINO)}


@pytest.fixture(scope='module')
def ref():
  with open(os.path.join(FIXTURES, 'settings.json')) as f:
    settings = json.load(f)
  return settings, dict(np.load(os.path.join(FIXTURES, 'release_outputs.npz')))


def _timm_features(ref, which: str) -> np.ndarray:
  """The release's features of one ViT for every view (global ones, then local)."""
  settings, out = ref
  ds = settings['siglip_dim']
  sl = slice(0, ds) if which == 'siglip' else slice(ds, None)
  glob = out['global_features'][..., sl]
  local = out['local_features'][..., sl]
  b, n = glob.shape[:2]
  s2 = settings['patchify_scale'] ** 2
  # Undo `(b hp wp) l c -> b (l hp wp) c`.
  local = local.reshape(b, n, s2, -1).transpose(0, 2, 1, 3).reshape(b * s2, n, -1)
  return np.concatenate([glob, local])


@pytest.mark.parametrize('which,folder', [('siglip', SIGLIP), ('dino', DINO)])
def test_intermediate_features_match_timm(ref, loaded, which, folder):
  settings, out = ref
  loaded = loaded[folder]
  views = out['views'].astype(np.float32) / 255.0
  pixels = (views - np.asarray(loaded.mean, np.float32)) / np.asarray(loaded.std, np.float32)
  layers = tuple(settings[f'{which}_layers'])
  (got,) = jax.jit(lambda p, x: loaded.module.apply({'params': p}, x, layers))(
      loaded.params, pixels)
  want = _timm_features(ref, which)
  grid = settings['image_size'] // 14
  assert got.shape == want.shape == (len(views), grid * grid, settings[f'{which}_dim'])
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


def test_architecture_flags_of_the_release_models(ref):
  settings, _ = ref
  _, siglip, _ = vit.read_timm_config(os.path.join(FIXTURES, SIGLIP))
  _, dino, _ = vit.read_timm_config(os.path.join(FIXTURES, DINO))
  assert (siglip.class_token, siglip.reg_tokens, siglip.layer_scale, siglip.gelu_tanh) == (
      False, 0, False, False)
  assert siglip.mlp_dim == int(settings['siglip_dim'] * 3.7362)
  assert (dino.class_token, dino.reg_tokens, dino.no_embed_class, dino.layer_scale) == (
      True, 4, True, True)
  assert dino.num_prefix_tokens == 5 and dino.pos_embed_len == dino.grid_size ** 2


@pytest.mark.parametrize('arch,want', [
    (SIGLIP, dict(embed_dim=1152, depth=27, num_heads=16, mlp_dim=4304, class_token=False,
                  reg_tokens=0, layer_scale=False, pos_embed_len=729)),
    (DINO, dict(embed_dim=1024, depth=24, num_heads=16, mlp_dim=4096, class_token=True,
                reg_tokens=4, layer_scale=True, pos_embed_len=729)),
])
def test_hub_config_gives_the_full_size_architecture(tmp_path, arch, want):
  # timm's hub config.json names the architecture only (no model_args).
  with open(os.path.join(FIXTURES, arch, 'config.json')) as f:
    hub = json.load(f)
  hub.pop('model_args')
  (tmp_path / 'config.json').write_text(json.dumps(hub))
  _, config, _ = vit.read_timm_config(str(tmp_path), img_size=384)
  assert config.grid_size == 27  # 384 = 27 * 14 + 6: the last 6 pixels are dropped
  assert {k: getattr(config, k) for k in want} == want
  # At the checkpoint's own size (518 px for DINOv2), every tensor of the full-size
  # timm model is read with timm's shape, or belongs to a head the release never runs.
  _, native, _ = vit.read_timm_config(str(tmp_path))
  with open(os.path.join(FIXTURES, 'timm_full_size_shapes.json')) as f:
    timm_shapes = {k: tuple(v) for k, v in json.load(f)[arch].items()}
  ours = vit.timm_state_shapes(native)
  assert {k: timm_shapes.get(k) for k in ours} == ours
  unused = set(timm_shapes) - set(ours)
  assert all(k.startswith(('norm.', 'attn_pool.')) for k in unused), sorted(unused)


def test_pos_embed_made_at_another_size_is_resampled_like_timm(ref, loaded):
  settings, out = ref
  dino = loaded[DINO]
  assert dino.checkpoint_grid == settings['checkpoint_sizes'][DINO] // 14 != dino.config.grid_size
  np.testing.assert_allclose(np.asarray(dino.params['pos_embed']), out['dino_pos_embed'],
                             rtol=0, atol=1e-6)
  siglip = loaded[SIGLIP]
  stored = safetensors.numpy.load_file(os.path.join(FIXTURES, SIGLIP, 'model.safetensors'))
  np.testing.assert_array_equal(np.asarray(siglip.params['pos_embed']),
                                stored['pos_embed'].astype(np.float32))
  np.testing.assert_array_equal(out['siglip_pos_embed'], stored['pos_embed'])


@pytest.mark.parametrize('case', ['up', 'down'])
def test_resample_pos_embed_matches_timm(ref, case):
  _, out = ref
  src, want = out[f'resample_{case}_in'], out[f'resample_{case}_out']
  grid = int(np.sqrt(want.shape[1] - 1))
  got = vit.resample_pos_embed(src, grid, num_prefix_tokens=1)
  np.testing.assert_array_equal(got[:, :1], src[:, :1])  # class entry kept as is
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_block_indices_follow_timm():
  assert vit.block_indices((25,), 27) == (25,)
  assert vit.block_indices((-1, -2), 27) == (25, 26)  # negative: from the end
  assert vit.block_indices((3, 0, 0), 4) == (0, 3)  # a sorted set, as timm takes them
  for bad in ((4,), (-5,), ()):
    with pytest.raises(ValueError):
      vit.block_indices(bad, 4)


def test_one_output_per_distinct_block(ref, loaded):
  _, out = ref
  loaded = loaded[DINO]
  x = (out['views'][:2].astype(np.float32) / 255.0 - 0.45) / 0.23
  run = jax.jit(lambda p, x: loaded.module.apply({'params': p}, x, (-1, 0, 0)))
  first, last = run(loaded.params, x)
  assert first.shape == last.shape == (2, loaded.config.grid_size ** 2, 32)
  assert np.abs(np.asarray(first) - np.asarray(last)).max() > 0.1


def test_wrong_image_size_is_refused(ref, loaded):
  settings, _ = ref
  loaded = loaded[SIGLIP]
  side = settings['image_size'] + 14
  with pytest.raises(ValueError, match='expects images'):
    loaded.module.apply({'params': loaded.params}, np.zeros((1, side, side, 3), np.float32))


@pytest.fixture
def dino_copy(tmp_path):
  return shutil.copytree(os.path.join(FIXTURES, DINO), tmp_path / 'dino')


def _edit_config(folder, **changes):
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    config = json.load(f)
  for key, value in changes.items():
    if key == 'model_args':
      config['model_args'].update(value)
    else:
      config[key] = value
  with open(path, 'w') as f:
    json.dump(config, f)


@pytest.mark.parametrize('breakage,message', [
    ('no_dir', 'does not exist'),
    ('no_config', 'missing config file'),
    ('bad_json', 'not valid JSON'),
    ('no_weights', 'missing weights file'),
    ('pickle_only', 'pickle weights'),
    ('bad_weights', 'cannot read safetensors'),
    ('unknown_arch', 'not supported'),
    ('deeper_config', 'lacks'),
    ('shallower_config', 'does not have'),
    ('wider_config', 'has shape'),
    ('unsupported_arg', 'unsupported ViT argument'),
])
def test_bad_checkpoints_give_one_line_errors(dino_copy, breakage, message):
  folder = str(dino_copy)
  if breakage == 'no_dir':
    folder += '_missing'
  elif breakage == 'no_config':
    os.remove(os.path.join(folder, 'config.json'))
  elif breakage == 'bad_json':
    with open(os.path.join(folder, 'config.json'), 'w') as f:
      f.write('{"architecture": ')
  elif breakage in ('no_weights', 'pickle_only'):
    os.remove(os.path.join(folder, 'model.safetensors'))
    if breakage == 'pickle_only':
      open(os.path.join(folder, 'pytorch_model.bin'), 'wb').close()
  elif breakage == 'bad_weights':
    with open(os.path.join(folder, 'model.safetensors'), 'wb') as f:
      f.write(b'not a safetensors file')
  elif breakage == 'unknown_arch':
    _edit_config(folder, architecture='vit_huge_patch14_clip_224')
  elif breakage == 'deeper_config':
    _edit_config(folder, model_args=dict(depth=5))
  elif breakage == 'shallower_config':
    _edit_config(folder, model_args=dict(depth=3))
  elif breakage == 'wider_config':
    _edit_config(folder, model_args=dict(embed_dim=48))
  elif breakage == 'unsupported_arg':
    _edit_config(folder, model_args=dict(qk_norm=True))
  with pytest.raises(weights.CheckpointError, match=message) as err:
    vit.load_vit(folder, 76)
  assert '\n' not in str(err.value)
