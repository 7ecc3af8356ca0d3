"""Loading real on-disk SD / CLIP layouts without torch, checked against torch itself."""
import functools
import json
import os
import shutil

from configs import tiny as tiny_config
from diffusers import FlaxUNet2DConditionModel
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from realcustom_jax import encoders
from realcustom_jax.release import sdxl_text
from realcustom_jax.loading import tiny
from realcustom_jax.release import tiny_sdxl
from realcustom_jax import adapter as adapter_lib
from realcustom_jax.loading import weights
from realcustom_jax.release import sdxl_loading
from realcustom_jax.unet import RealCustomUNet
from tests import testing

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:  # the SD tests compare with torch; the SDXL ones need none
  torch = None


@pytest.fixture(scope='module')
def saved(tiny_pretrained):
  config = tiny_config.get_config()
  sd_dir, vision_dir = tiny_pretrained
  return dict(
      config=config, sd_dir=sd_dir, vision_dir=vision_dir,
      sd=weights.load_stable_diffusion(sd_dir),
      vision=weights.load_vision_encoder(vision_dir),
      torch=testing.load_torch_models(sd_dir, vision_dir))


@pytest.fixture
def sd_copy(saved, tmp_path):
  """A throw-away copy of the saved SD directory to break on purpose."""
  return shutil.copytree(saved['sd_dir'], tmp_path / 'sd')


def _flat(tree):
  return traverse_util.flatten_dict(flax.core.unfreeze(tree))


def test_unet_tree_is_diffusers_flax_tree(saved):
  unet = FlaxUNet2DConditionModel.from_config(tiny.unet_config(saved['config']))
  want = _flat(jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)))
  got = _flat(saved['sd'].unet_params)
  assert set(got) == set(want)
  for key, shape in want.items():
    assert got[key].shape == shape.shape, key
    assert got[key].dtype == jnp.float32, key


def test_unet_matches_torch(saved):
  sd = saved['sd']
  unet = FlaxUNet2DConditionModel.from_config(sd.unet_config)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
  context = rng.standard_normal((2, 77, 32)).astype(np.float32)
  t = np.array([10, 700])
  got = jax.jit(unet.apply)({'params': sd.unet_params}, x, t, context).sample
  with torch.no_grad():
    want = saved['torch']['unet'](torch.from_numpy(x), torch.from_numpy(t),
                                  torch.from_numpy(context)).sample.numpy()
  # Flax GEGLU uses tanh-approximate gelu, torch the exact one: ~5e-5 apart here.
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_vae_decode_matches_torch(saved):
  sd = saved['sd']
  z = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
  decode = jax.jit(lambda p, z: sd.vae.apply({'params': p}, z, method=sd.vae.decode).sample)
  got = decode(sd.vae_params, z)
  with torch.no_grad():
    want = saved['torch']['vae'].decode(torch.from_numpy(z)).sample.numpy()
  assert got.shape == (1, 3, 32, 32)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_text_encoder_matches_torch(saved):
  sd = saved['sd']
  ids = encoders.tokenize(sd.tokenizer, ['a red toy on the beach', 'a zebra'])
  got = jax.jit(functools.partial(encoders.encode_text, sd.text_encoder))(sd.text_params, ids)
  with torch.no_grad():
    want = saved['torch']['text_encoder'](torch.from_numpy(ids.astype(np.int64)))[0].numpy()
  assert got.shape == (2, 77, 32)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_vision_features_match_torch_penultimate_patches(saved):
  vision = saved['vision']
  pixels = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
  got = jax.jit(functools.partial(encoders.image_features, vision.model))(vision.params, pixels)
  with torch.no_grad():
    out = saved['torch']['vision'](torch.from_numpy(pixels), output_hidden_states=True)
  want = out.hidden_states[-2][:, 1:].numpy()
  assert got.shape == (2, 16, 48)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)


def test_loaded_settings(saved):
  sd, vision = saved['sd'], saved['vision']
  assert sd.vae_scale_factor == 4
  assert sd.scaling_factor == pytest.approx(0.18215)
  assert sd.scheduler_config['beta_schedule'] == 'scaled_linear'
  assert sd.scheduler_config['steps_offset'] == 1
  assert sd.unet_config['block_out_channels'] == (32, 64)
  prompt = 'a zebra toy, on the beach!'
  assert sd.tokenizer(prompt).input_ids == tiny.build_tokenizer()(prompt).input_ids
  assert (vision.image_size, vision.resize_size, vision.resample) == (32, 32, 3)
  assert vision.num_patches == 16 and vision.hidden_size == 48


def test_pickle_refused_without_flag(saved, sd_copy):
  unet_dir = sd_copy / 'unet'
  state = saved['torch']['unet'].state_dict()
  torch.save(state, unet_dir / 'diffusion_pytorch_model.bin')
  os.remove(unet_dir / 'diffusion_pytorch_model.safetensors')
  with pytest.raises(ValueError, match=r'diffusion_pytorch_model\.bin.*allow_pickle'):
    weights.load_stable_diffusion(sd_copy)
  loaded = weights.load_stable_diffusion(sd_copy, allow_pickle=True)
  got, want = _flat(loaded.unet_params), _flat(saved['sd'].unet_params)
  assert all(np.array_equal(got[k], want[k]) for k in want)


def test_flax_msgpack_weights(saved, sd_copy):
  unet_dir = sd_copy / 'unet'
  params = jax.tree.map(lambda x: x * 2, saved['sd'].unet_params)
  (unet_dir / 'diffusion_flax_model.msgpack').write_bytes(flax.serialization.to_bytes(params))
  os.remove(unet_dir / 'diffusion_pytorch_model.safetensors')
  loaded = weights.load_stable_diffusion(sd_copy)
  got, want = _flat(loaded.unet_params), _flat(params)
  assert all(np.array_equal(got[k], want[k]) for k in want)


def test_missing_directory(tmp_path):
  with pytest.raises(ValueError, match='nowhere.*does not exist'):
    weights.load_stable_diffusion(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='nowhere.*does not exist'):
    weights.load_vision_encoder(tmp_path / 'nowhere')


def test_missing_subfolder(sd_copy):
  shutil.rmtree(sd_copy / 'text_encoder')
  with pytest.raises(ValueError, match=r'no text_encoder/ subfolder') as e:
    weights.load_stable_diffusion(sd_copy)
  assert '\n' not in str(e.value)


def test_missing_weights_file_names_expected_files(sd_copy):
  os.remove(sd_copy / 'vae' / 'diffusion_pytorch_model.safetensors')
  with pytest.raises(ValueError, match=r'no weights file in .*vae.*diffusion_pytorch_model'
                     r'\.safetensors.*diffusion_flax_model\.msgpack'):
    weights.load_stable_diffusion(sd_copy)


@pytest.mark.parametrize('change, message', [
    ({'addition_embed_type': 'text_time'}, 'SDXL UNet: load the directory with load_sdxl'),
    ({'addition_embed_type': 'image'}, "addition_embed_type='image' is not supported"),
    ({'in_channels': 9}, 'in_channels=9'),
    ({'resnet_time_scale_shift': 'scale_shift'}, 'resnet_time_scale_shift'),
])
def test_unsupported_unet_refused(sd_copy, change, message):
  path = sd_copy / 'unet' / 'config.json'
  config = json.loads(path.read_text())
  testing.write_json(path, {**config, **change})
  with pytest.raises(ValueError, match=message):
    weights.load_stable_diffusion(sd_copy)


def test_weights_not_matching_config_refused(sd_copy):
  path = sd_copy / 'unet' / 'config.json'
  config = json.loads(path.read_text())
  testing.write_json(path, {**config, 'layers_per_block': 2})
  with pytest.raises(ValueError,
                     match=r'diffusion_pytorch_model\.safetensors does not fit its config'):
    weights.load_stable_diffusion(sd_copy)


def test_adapter_round_trip(tmp_path):
  rng = np.random.default_rng(3)
  params = {
      'scoring': {'text_mlp': {'kernel': rng.standard_normal((5, 7)).astype(np.float32)}},
      'visual_kv': {'down_0': {'to_k_ip': jnp.asarray(rng.standard_normal((3, 2)),
                                                      jnp.bfloat16)}},
      'count': np.arange(4, dtype=np.int32),
  }
  path = tmp_path / 'adapter.safetensors'
  adapter_lib.save_adapter(path, params, metadata={'config': json.dumps({'k': 1})})
  back = adapter_lib.load_adapter(path)
  want, got = _flat(params), _flat(back)
  assert set(got) == set(want)
  for key in want:
    assert got[key].dtype == np.asarray(want[key]).dtype, key
    assert np.array_equal(np.asarray(got[key]), np.asarray(want[key])), key
  assert got[('visual_kv', 'down_0', 'to_k_ip')].dtype == ml_dtypes.bfloat16
  assert json.loads(adapter_lib.load_adapter_metadata(path)['config']) == {'k': 1}


def test_adapter_path_must_be_safetensors(tmp_path):
  with pytest.raises(ValueError, match=r'adapter\.npz must end in \.safetensors'):
    adapter_lib.save_adapter(tmp_path / 'adapter.npz', {'a': np.zeros(2)})
  with pytest.raises(ValueError, match=r'adapter\.ckpt must end in \.safetensors'):
    adapter_lib.load_adapter(tmp_path / 'adapter.ckpt')


# ---------------------------------------------------------------------------------
# SDXL directories
# ---------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def sdxl_dir(tmp_path_factory):
  return tiny_sdxl.write_tiny_sdxl(str(tmp_path_factory.mktemp('tiny_sdxl') / 'sdxl'))


@pytest.fixture
def sdxl_copy(sdxl_dir, tmp_path):
  """A throw-away copy of the tiny SDXL directory to break on purpose."""
  return shutil.copytree(sdxl_dir, tmp_path / 'sdxl')


def test_sdxl_directory_loads_and_runs_end_to_end(sdxl_dir):
  sd = sdxl_loading.load_sdxl(sdxl_dir)
  assert sd.scaling_factor == pytest.approx(0.13025) and sd.vae_scale_factor == 2
  assert sd.scheduler_config['_class_name'] == 'EulerDiscreteScheduler'
  assert (sd.tokenizer.pad_token, sd.tokenizer_2.pad_token) == (tiny.EOS, '!')
  unet = FlaxUNet2DConditionModel.from_config(sd.unet_config)
  want = _flat(jax.eval_shape(unet.init_weights, jax.random.PRNGKey(0)))
  got = _flat(sd.unet_params)
  assert set(got) == set(want) and ('add_embedding', 'linear_1', 'kernel') in got
  assert all(got[k].shape == v.shape for k, v in want.items())
  assert sd.text_params['text_projection'].shape == (20, 20)

  prompts = ['a red toy on the beach', 'a photo of a dog']
  ids, ids_2 = sdxl_text.tokenize(sd.tokenizer, sd.tokenizer_2, prompts)
  model = RealCustomUNet.from_config(sd.unet_config)
  latents = np.ones((2, 4, 8, 8), np.float32)  # the same: rows differ only by their prompt
  time_ids = np.stack([sdxl_text.release_time_ids(16, 16)] * 2)

  @jax.jit
  def run(text_params, unet_params):
    context, pooled = sdxl_text.encode(sd.text_encoder, sd.text_encoder_2, text_params, ids,
                                       ids_2)
    return context, pooled, model.apply(
        {'params': unet_params}, latents, np.array([500, 500]), context,
        added_cond=dict(text_embeds=pooled, time_ids=time_ids))

  context, pooled, out = run(sd.text_params, sd.unet_params)
  assert context.shape == (2, 77, 32) and pooled.shape == (2, 20)
  assert out.shape == (2, 4, 8, 8) and bool(jnp.isfinite(out).all())
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-4


@pytest.mark.parametrize('remove, message', [
    ('text_encoder_2', r'has no text_encoder_2/ subfolder'),
    ('tokenizer_2/merges.txt', r'tokenizer file .*tokenizer_2/(vocab\.json|merges\.txt) is missing'),
    ('text_encoder/config.json', r'missing config file .*text_encoder/config\.json'),
    ('unet/config.json', r'missing config file .*unet/config\.json'),
    ('text_encoder_2/flax_model.msgpack', r'no weights file in .*text_encoder_2: expected'),
    ('vae/diffusion_flax_model.msgpack', r'no weights file in .*vae: expected'),
])
def test_sdxl_missing_file_is_named(sdxl_copy, remove, message):
  target = sdxl_copy / remove
  if target.is_dir():
    shutil.rmtree(target)
  else:
    if target.name == 'merges.txt':  # a tokenizer.json (transformers 5 writes one) would do
      (target.parent / 'tokenizer.json').unlink(missing_ok=True)
    target.unlink(missing_ok=target.name == 'merges.txt')
  with pytest.raises(weights.CheckpointError, match=message) as e:
    sdxl_loading.load_sdxl(sdxl_copy)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('change, message', [
    ({'addition_embed_type': None}, 'load_stable_diffusion'),
    ({'cross_attention_dim': 48}, r'cross_attention_dim 48 is not the sum .* 12 \+ 20'),
    ({'projection_class_embeddings_input_dim': 24 + 6 * 8}, '24-wide pooled'),
    ({'addition_time_embed_dim': None}, 'integer addition_time_embed_dim'),
])
def test_sdxl_unet_config_not_fitting_is_refused(sdxl_copy, change, message):
  path = sdxl_copy / 'unet' / 'config.json'
  testing.write_json(path, {**json.loads(path.read_text()), **change})
  with pytest.raises(weights.CheckpointError, match=message):
    sdxl_loading.load_sdxl(sdxl_copy)


def test_sdxl_directory_refused_by_the_sd_loader(sdxl_dir):
  with pytest.raises(weights.CheckpointError, match='SDXL UNet: load the directory with '
                     'load_sdxl'):
    weights.load_stable_diffusion(sdxl_dir)
