"""The project's Flax CLIP against transformers' torch CLIP (the reference) and against
the transformers Flax CLIP it replaces, on tiny random configs saved with
`save_pretrained` (safetensors) and read back through `clip.params_from_torch_state`."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realcustom_jax import clip
from realcustom_jax.loading import formats

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TEXT = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=16)
VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
              num_attention_heads=4, image_size=28, patch_size=7)
TOLERANCE = 1e-5


def _save(model, tmp_path, name):
  folder = str(tmp_path / name)
  model.save_pretrained(folder, safe_serialization=True)
  with open(os.path.join(folder, 'config.json')) as f:
    raw = json.load(f)
  return folder, raw


def _ours(module_cls, folder, raw, tower, with_projection, example):
  config = clip.CLIPConfig.from_dict(raw, with_projection=with_projection)
  module = module_cls(config)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), example)['params']
  state = formats.read_torch_state(os.path.join(folder, 'model.safetensors'), False)
  params = clip.params_from_torch_state(state, tower, shapes)
  return module, jax.tree.map(jnp.asarray, params)


def _worst(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize('act, eos, with_projection', [
    ('quick_gelu', 2, False),  # SD 1.x's text encoder
    ('gelu', 2, True),  # SDXL's text_encoder_2 (OpenCLIP bigG): gelu + projection
    ('quick_gelu', 98, False)])  # a config with a true end token id
def test_text_tower_matches_torch(tmp_path, act, eos, with_projection):
  torch.manual_seed(0)
  cfg = transformers.CLIPTextConfig(**TEXT, hidden_act=act, eos_token_id=eos,
                                    projection_dim=24)
  cls = (transformers.CLIPTextModelWithProjection if with_projection
         else transformers.CLIPTextModel)
  reference = cls(cfg).eval()
  folder, raw = _save(reference, tmp_path, 'text')
  ids = np.array([[0, 5, 17, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98],
                  [0, 40, 3, 61, 9, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98, 98]], np.int64)
  with torch.no_grad():
    want = reference(torch.from_numpy(ids), output_hidden_states=True)
  module, params = _ours(clip.CLIPTextModel, folder, raw, 'text', with_projection,
                         jnp.zeros((1, 16), jnp.int32))
  got = module.apply({'params': params}, jnp.asarray(ids, jnp.int32))
  assert _worst(got.last_hidden_state, want.last_hidden_state) <= TOLERANCE
  assert len(got.hidden_states) == len(want.hidden_states) == 4
  for ours, theirs in zip(got.hidden_states, want.hidden_states):
    assert _worst(ours, theirs) <= TOLERANCE
  if with_projection:
    assert _worst(got.embeds, want.text_embeds) <= TOLERANCE
  else:
    assert got.embeds is None
    assert _worst(got.pooled, want.pooler_output) <= TOLERANCE
  worst = max(_worst(a, b) for a, b in zip(got.hidden_states, want.hidden_states))
  print(f'CLIP text parity ({act}, eos {eos}, projection {with_projection}): hidden '
        f'states {worst:.1e}, last {_worst(got.last_hidden_state, want.last_hidden_state):.1e}')


@pytest.mark.parametrize('with_projection', [False, True])
def test_vision_tower_matches_torch(tmp_path, with_projection):
  torch.manual_seed(1)
  cfg = transformers.CLIPVisionConfig(**VISION, projection_dim=24)
  cls = (transformers.CLIPVisionModelWithProjection if with_projection
         else transformers.CLIPVisionModel)
  reference = cls(cfg).eval()
  folder, raw = _save(reference, tmp_path, 'vision')
  pixels = np.random.default_rng(0).normal(size=(2, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.from_numpy(pixels), output_hidden_states=True)
  module, params = _ours(clip.CLIPVisionModel, folder, raw, 'vision', with_projection,
                         jnp.zeros((1, 28, 28, 3)))
  got = module.apply({'params': params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
  assert _worst(got.last_hidden_state, want.last_hidden_state) <= TOLERANCE
  for ours, theirs in zip(got.hidden_states, want.hidden_states):
    assert _worst(ours, theirs) <= TOLERANCE
  if with_projection:
    assert _worst(got.embeds, want.image_embeds) <= TOLERANCE
  else:
    assert _worst(got.pooled, want.pooler_output) <= TOLERANCE
  worst = max(_worst(a, b) for a, b in zip(got.hidden_states, want.hidden_states))
  print(f'CLIP vision parity (projection {with_projection}): hidden states {worst:.1e}')


def test_the_loaders_give_the_numbers_of_the_transformers_flax_classes(tmp_path):
  """The loaders (`loading.weights`, the project's CLIP since issue 30) against the
  transformers Flax CLIP they replaced, on the same files: the swap changes no number.
  Runs while the installed transformers still has Flax (< 5)."""
  if not hasattr(transformers, 'FlaxCLIPTextModel'):
    pytest.skip('transformers >= 5 has no Flax CLIP to compare with')
  from realcustom_jax import encoders  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import weights  # pylint: disable=g-import-not-at-top
  torch.manual_seed(2)
  folder, _ = _save(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
                    tmp_path, 'text')
  model, params, _ = weights.load_text_encoder(folder)
  theirs = transformers.FlaxCLIPTextModel.from_pretrained(folder, from_pt=True)
  ids = jnp.asarray([[0, 5, 17, 98] + [98] * 12], jnp.int32)
  want = theirs(ids, output_hidden_states=True)
  got = model.apply({'params': params}, ids)
  assert _worst(got.last_hidden_state, want.last_hidden_state) <= TOLERANCE
  assert _worst(got.hidden_states[-2], want.hidden_states[-2]) <= TOLERANCE
  assert _worst(encoders.encode_text(model, params, ids), want.last_hidden_state) <= TOLERANCE
  folder, _ = _save(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)),
                    tmp_path, 'vision')
  encoder = weights.load_vision_encoder(folder)
  theirs = transformers.FlaxCLIPVisionModel.from_pretrained(folder, from_pt=True)
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, 28, 28)), jnp.float32)
  want = theirs(pixels, output_hidden_states=True)
  assert _worst(encoders.image_features(encoder.model, encoder.params, pixels),
                want.hidden_states[-2][:, 1:]) <= TOLERANCE
  got = encoder.model.apply({'params': encoder.params}, jnp.transpose(pixels, (0, 2, 3, 1)))
  assert _worst(got.pooled, want.pooler_output) <= TOLERANCE


def test_flax_layout_round_trip_and_the_msgpack_loader(tmp_path):
  """transformers' Flax layout (the msgpack files the tiny and toy models are written
  in) maps onto our tree and back unchanged, and a msgpack folder loads to the same
  numbers as the safetensors one."""
  import flax  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import weights  # pylint: disable=g-import-not-at-top
  torch.manual_seed(4)
  cfg = transformers.CLIPTextConfig(**TEXT, projection_dim=24)
  folder, raw = _save(transformers.CLIPTextModelWithProjection(cfg), tmp_path, 'text')
  ids = jnp.asarray([[0, 5, 17, 98] + [98] * 12], jnp.int32)
  module, params = _ours(clip.CLIPTextModel, folder, raw, 'text', True, ids)
  layout = clip.params_to_flax_layout(params, 'text')
  assert set(layout) == {'text_model', 'text_projection'}
  assert set(layout['text_model']) == {'embeddings', 'encoder', 'final_layer_norm'}
  assert set(layout['text_model']['encoder']['layers']) == {'0', '1', '2'}
  back = clip.params_from_flax_layout(layout, 'text', clip.param_shapes(module))
  jax.tree.map(np.testing.assert_array_equal, back, params)
  msgpack_dir = tmp_path / 'msgpack'
  msgpack_dir.mkdir()
  (msgpack_dir / 'config.json').write_text(json.dumps(raw))
  (msgpack_dir / 'flax_model.msgpack').write_bytes(
      flax.serialization.msgpack_serialize(jax.tree.map(np.asarray, layout)))
  from_safetensors = weights.load_text_encoder(folder)
  from_msgpack = weights.load_text_encoder(str(msgpack_dir))
  jax.tree.map(np.testing.assert_array_equal, from_msgpack[1], from_safetensors[1])
  np.testing.assert_array_equal(from_msgpack[2], from_safetensors[2])  # the projection
  assert 'text_projection' not in from_msgpack[1]
  with pytest.raises(ValueError, match='lacks text parameter final_layer_norm/'):
    broken = dict(layout, text_model={k: v for k, v in layout['text_model'].items()
                                      if k != 'final_layer_norm'})
    clip.params_from_flax_layout(broken, 'text', clip.param_shapes(module))


def test_a_missing_or_misshapen_parameter_is_named(tmp_path):
  torch.manual_seed(3)
  folder, raw = _save(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)),
                      tmp_path, 'text')
  config = clip.CLIPConfig.from_dict(raw)
  module = clip.CLIPTextModel(config)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 16), jnp.int32))['params']
  state = formats.read_torch_state(os.path.join(folder, 'model.safetensors'), False)
  broken = {k: v for k, v in state.items() if 'layers.1.mlp.fc2.weight' not in k}
  with pytest.raises(ValueError, match='lacks text parameter encoder/layers_1/mlp/fc2/kernel'):
    clip.params_from_torch_state(broken, 'text', shapes)
  norm = next(k for k in state if k.endswith('final_layer_norm.weight'))  # any prefix
  wide = dict(state, **{norm: np.ones(33, np.float32)})
  with pytest.raises(ValueError, match=r'final_layer_norm/scale has shape \(33,\)'):
    clip.params_from_torch_state(wide, 'text', shapes)
  with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
    clip.CLIPConfig.from_dict(dict(raw, hidden_act='relu'))


def test_a_config_object_gives_the_config_of_its_dict():
  text = transformers.CLIPTextConfig(**TEXT, projection_dim=8)
  from_object = clip.CLIPConfig.from_dict(text, with_projection=True)
  assert from_object == clip.CLIPConfig.from_dict(text.to_dict(), with_projection=True)
  assert (from_object.hidden_size, from_object.projection_dim) == (TEXT['hidden_size'], 8)
  assert clip.CLIPConfig.from_dict(text).projection_dim is None
