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


def test_same_numbers_as_the_transformers_flax_classes(tmp_path):
  """What the project loads today (`loading.weights`, transformers' Flax CLIP) and the
  project's own module agree on the same files: the swap changes no number."""
  from realcustom_jax.loading import weights  # pylint: disable=g-import-not-at-top
  torch.manual_seed(2)
  text_cfg = transformers.CLIPTextConfig(**TEXT)
  folder, raw = _save(transformers.CLIPTextModel(text_cfg), tmp_path, 'text')
  flax_model, flax_params, _ = weights.load_text_encoder(folder)
  ids = jnp.asarray([[0, 5, 17, 98] + [98] * 12], jnp.int32)
  theirs = flax_model(ids, params=flax_params, output_hidden_states=True)
  module, params = _ours(clip.CLIPTextModel, folder, raw, 'text', False, ids)
  ours = module.apply({'params': params}, ids)
  assert _worst(ours.last_hidden_state, theirs.last_hidden_state) <= TOLERANCE
  assert _worst(ours.hidden_states[-2], theirs.hidden_states[-2]) <= TOLERANCE
  vision_cfg = transformers.CLIPVisionConfig(**VISION)
  folder, raw = _save(transformers.CLIPVisionModel(vision_cfg), tmp_path, 'vision')
  encoder = weights.load_vision_encoder(folder)
  pixels = jnp.asarray(np.random.default_rng(1).normal(size=(1, 28, 28, 3)), jnp.float32)
  theirs = encoder.model(jnp.transpose(pixels, (0, 3, 1, 2)), params=encoder.params)
  module, params = _ours(clip.CLIPVisionModel, folder, raw, 'vision', False, pixels)
  ours = module.apply({'params': params}, pixels)
  assert _worst(ours.last_hidden_state, theirs.last_hidden_state) <= TOLERANCE


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
  wide = dict(state, **{'text_model.final_layer_norm.weight': np.ones(33, np.float32)})
  with pytest.raises(ValueError, match=r'final_layer_norm/scale has shape \(33,\)'):
    clip.params_from_torch_state(wide, 'text', shapes)
  with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
    clip.CLIPConfig.from_dict(dict(raw, hidden_act='relu'))
