"""Tokens, target-word positions, subject preprocessing and features; tiny components."""
import functools

from configs import tiny as tiny_config
from flax import traverse_util
import jax
import numpy as np
from PIL import Image
import pytest
from realcustom_jax import encoders
from realcustom_jax.loading import tiny
from realcustom_jax.loading import weights
import transformers


@pytest.fixture(scope='module')
def tokenizer():
  return tiny.build_tokenizer()


@pytest.fixture(scope='module')
def components(tiny_components):
  return tiny_components


def _decode(tokenizer, prompt, indices):
  ids = tokenizer(prompt).input_ids
  return tokenizer.decode([ids[i] for i in indices]).strip()


def test_tokenize_pads_to_model_length(tokenizer):
  ids = encoders.tokenize(tokenizer, ['a toy on the beach', 'a dog'])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert list(ids[1, :4]) == tokenizer('a dog').input_ids
  assert (ids[1, 4:] == tokenizer.pad_token_id).all()


def test_tokenize_warns_and_truncates_long_prompt(tokenizer):
  long_prompt = 'a red dog ' * 30 + 'on the beach'
  with pytest.warns(UserWarning, match=r"'a red dog a red dog.*longer than 77 tokens.*beach"):
    ids = encoders.tokenize(tokenizer, [long_prompt])
  assert ids.shape == (1, 77)
  assert ids[0, -1] == tokenizer.eos_token_id


def test_tokenize_rejects_bare_string(tokenizer):
  with pytest.raises(ValueError, match='non-empty list'):
    encoders.tokenize(tokenizer, 'a toy')


def test_single_token_word(tokenizer):
  # position 0 is the start token
  assert encoders.word_token_indices(tokenizer, 'a toy on the beach', 'toy') == [2]


def test_multi_token_word(tokenizer):
  prompt = 'a zebra on the beach'
  indices = encoders.word_token_indices(tokenizer, prompt, 'zebra')
  assert len(indices) > 1
  assert indices == list(range(2, 2 + len(indices)))
  assert _decode(tokenizer, prompt, indices) == 'zebra'


def test_repeated_word_and_case(tokenizer):
  assert encoders.word_token_indices(tokenizer, 'A Toy and a toy', 'TOY') == [2, 5]


def test_multi_word_phrase(tokenizer):
  prompt = 'a teddy bear on the grass'
  indices = encoders.word_token_indices(tokenizer, prompt, 'teddy bear')
  assert indices == [2, 3]
  assert _decode(tokenizer, prompt, indices) == 'teddy bear'


def test_word_must_be_whole(tokenizer):
  # 'ar' is the tail of 'bar' token for token ('b', 'a', 'r</w>' vs 'a', 'r</w>').
  with pytest.raises(ValueError, match=r"'ar' does not occur in prompt 'a bar'"):
    encoders.word_token_indices(tokenizer, 'a bar', 'ar')


def test_absent_word_names_word_and_prompt(tokenizer):
  with pytest.raises(ValueError, match=r"'cat' does not occur in prompt 'a toy on the beach'"):
    encoders.word_token_indices(tokenizer, 'a toy on the beach', 'cat')


def test_word_only_in_truncated_part(tokenizer):
  prompt = 'a dog ' * 40 + 'and a toy'
  with pytest.raises(ValueError, match="'toy'.*cut by truncation"):
    encoders.word_token_indices(tokenizer, prompt, 'toy')


def test_word_token_weights(tokenizer):
  prompts = ['a toy and a toy', 'a teddy bear']
  w = encoders.word_token_weights(tokenizer, prompts, ['toy', 'teddy bear'])
  assert w.shape == (2, 77) and w.dtype == np.float32
  assert list(np.flatnonzero(w[0])) == [2, 5]
  assert list(np.flatnonzero(w[1])) == [2, 3]
  assert set(np.unique(w)) == {0.0, 1.0}
  with pytest.raises(ValueError, match='one target word per prompt'):
    encoders.word_token_weights(tokenizer, prompts, ['toy'])


def test_preprocess_matches_clip_image_processor():
  vision = weights.VisionEncoder(model=None, params=None, image_size=32, resize_size=36,
                                 mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
  rng = np.random.default_rng(0)
  images = [Image.fromarray(rng.integers(0, 256, (50, 37, 3), np.uint8)),
            Image.fromarray(rng.integers(0, 256, (29, 61), np.uint8))]  # greyscale, wide
  got = encoders.preprocess_subject(images, vision)
  processor = transformers.CLIPImageProcessor(
      size={'shortest_edge': 36}, crop_size={'height': 32, 'width': 32},
      image_mean=list(vision.mean), image_std=list(vision.std))
  want = processor([im.convert('RGB') for im in images], return_tensors='np').pixel_values
  assert got.shape == (2, 3, 32, 32) and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_image_features_are_penultimate_patch_tokens(components):
  _, vision = components
  pixels = np.random.default_rng(1).standard_normal((3, 3, 32, 32)).astype(np.float32)
  feats = jax.jit(functools.partial(encoders.image_features, vision.model))(
      vision.params, pixels)
  out = vision.model.apply({'params': vision.params}, pixels.transpose(0, 2, 3, 1))
  assert feats.shape == (3, vision.num_patches, vision.hidden_size) == (3, 16, 48)
  np.testing.assert_allclose(np.asarray(feats), np.asarray(out.hidden_states[-2][:, 1:]),
                             atol=1e-5)
  assert not np.allclose(np.asarray(feats), np.asarray(out.last_hidden_state[:, 1:]))


def test_encode_text_shape(components):
  sd, _ = components
  ids = encoders.tokenize(sd.tokenizer, ['a toy', 'a cat on the beach'])
  out = encoders.encode_text(sd.text_encoder, sd.text_params, ids)
  assert out.shape == (2, 77, sd.unet_config['cross_attention_dim'])
  # Causal attention: the first tokens of both prompts ('<bos> a') see the same context.
  np.testing.assert_allclose(out[0, :2], out[1, :2], atol=1e-6)
  assert not np.allclose(out[0, 2], out[1, 2])


def test_tiny_components_consistent_and_deterministic(components):
  config = tiny_config.get_config()
  sd, vision = components
  sd2, vision2 = tiny.build_tiny_components(config)
  for a, b in [(sd.unet_params, sd2.unet_params), (sd.vae_params, sd2.vae_params),
               (sd.text_params, sd2.text_params), (vision.params, vision2.params)]:
    fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert set(fa) == set(fb)
    assert all(np.array_equal(fa[k], fb[k]) for k in fa)
  assert sd.vae_scale_factor * sd.unet_config['sample_size'] == config.resolution
  assert sd.text_encoder.config.hidden_size == sd.unet_config['cross_attention_dim']
  assert sd.scheduler_config['beta_schedule'] == 'scaled_linear'
  assert sd.scheduler_config['set_alpha_to_one'] is False


def test_tiny_tokenizer_covers_any_ascii(tokenizer):
  prompt = 'qzx 42 {weird} ~prompt~ with $ymbols!'
  ids = tokenizer(prompt).input_ids
  assert tokenizer.unk_token_id not in ids[1:-1]
  assert tokenizer.decode(ids[1:-1]).replace(' ', '') == prompt.replace(' ', '')


def test_tiny_rejects_inconsistent_resolution():
  config = tiny_config.get_config()
  config.resolution = 64
  with pytest.raises(ValueError, match='config.resolution=64'):
    tiny.build_tiny_components(config)
