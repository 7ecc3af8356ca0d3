"""CLIP-T / CLIP-I / DINO-I on tiny random models saved in the libraries' own formats."""
import os
import shutil

import numpy as np
from PIL import Image
import pytest
import transformers

from realcustom_jax.eval import metrics
from realcustom_jax.loading import tiny

transformers.logging.set_verbosity_error()


def _noise(h, w, seed, mode='RGB'):
  rng = np.random.default_rng(seed)
  shape = (h, w, 3) if mode == 'RGB' else (h, w)
  return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _cos_np(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """CLIP and DINO saved by torch (model.safetensors), read by the project's towers."""
  import torch  # pylint: disable=g-import-not-at-top  # test-only dependency
  root = tmp_path_factory.mktemp('models')
  clip_dir, dino_dir = str(root / 'clip'), str(root / 'dino')
  torch.manual_seed(0)
  tokenizer = tiny.build_tokenizer()
  config = metrics.tiny_clip_config(tokenizer)
  for c in (config, config.text_config, config.vision_config):
    c.initializer_factor = 5.0  # so that different images get different embeddings
  pt_clip = transformers.CLIPModel(config).eval()
  pt_clip.save_pretrained(clip_dir)
  tokenizer.save_pretrained(clip_dir)
  transformers.CLIPImageProcessor(
      size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}
  ).save_pretrained(clip_dir)
  dino_config = metrics.tiny_dino_config()
  dino_config.initializer_range = 1.0  # so that different images get different CLS tokens
  pt_dino = transformers.ViTModel(dino_config, add_pooling_layer=True).eval()
  pt_dino.save_pretrained(dino_dir)
  metrics._dino_processor(32).save_pretrained(dino_dir)
  assert os.path.isfile(os.path.join(clip_dir, 'model.safetensors'))
  assert os.path.isfile(os.path.join(dino_dir, 'model.safetensors'))
  return dict(clip_dir=clip_dir, dino_dir=dino_dir, pt_clip=pt_clip, pt_dino=pt_dino,
              clip=metrics.load_clip(clip_dir), dino=metrics.load_dino(dino_dir),
              torch=torch)


def test_cosine_matches_numpy_and_broadcasts():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
  got = np.asarray(metrics.cosine(a, b))
  want = [_cos_np(x, y) for x, y in zip(a, b)]
  np.testing.assert_allclose(got, want, atol=1e-6)
  # [G, 1, D] x [1, R, D] -> [G, R]: every pair.
  pairs = np.asarray(metrics.cosine(a[:, None], b[None]))
  assert pairs.shape == (3, 3)
  np.testing.assert_allclose(pairs[2, 0], _cos_np(a[2], b[0]), atol=1e-6)
  np.testing.assert_allclose(metrics.cosine(a[0], -2.5 * a[0]), -1.0, atol=1e-6)


def test_loaded_weights_are_the_saved_ones(saved):
  pt = saved['pt_clip'].text_projection.weight.detach().numpy()
  np.testing.assert_allclose(saved['clip'].params['text']['text_projection']['kernel'], pt.T,
                             atol=1e-6)
  np.testing.assert_allclose(saved['dino'].params['cls_token'],
                             saved['pt_dino'].embeddings.cls_token.detach().numpy(), atol=0)
  assert 'pooler' not in saved['dino'].params  # DINO-I reads the class token only


def test_embeddings_match_torch_reference(saved):
  """Our Flax CLIP (read from torch safetensors) reproduces torch's features."""
  clip, torch = saved['clip'], saved['torch']
  images = [_noise(40, 56, 0), _noise(33, 33, 1, 'L')]
  pix = clip.pixels(images)
  assert pix.shape == (2, 3, 32, 32)
  with torch.no_grad():
    want_img = saved['pt_clip'].get_image_features(pixel_values=torch.from_numpy(pix))
    ids = clip.tokenizer(['a backpack in the jungle'], padding='max_length',
                         max_length=77, return_tensors='pt')['input_ids']
    want_txt = saved['pt_clip'].get_text_features(input_ids=ids)
  # transformers 4 returns the projected features, 5 an output whose pooler_output they are.
  projected = lambda out: (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
  np.testing.assert_allclose(clip.embed_images(images), projected(want_img), atol=1e-4)
  np.testing.assert_allclose(clip.embed_texts(['a backpack in the jungle']),
                             projected(want_txt), atol=1e-4)
  dino = saved['dino']
  with torch.no_grad():
    want = saved['pt_dino'](pixel_values=torch.from_numpy(dino.pixels(images)))
  got = dino.embed_images(images)
  print(f'DINO parity: {np.abs(got - want.last_hidden_state[:, 0].numpy()).max():.2e}')
  np.testing.assert_allclose(got, want.last_hidden_state[:, 0].numpy(), atol=1e-5)
  assert np.abs(got[0] - got[1]).max() > 0.1  # the check can tell two images apart


def test_dino_msgpack_loads_as_the_transformers_flax_class_computes(saved, tmp_path):
  """A `flax_model.msgpack` DINO directory (transformers' Flax layout) loads to the same
  numbers as transformers' FlaxViTModel gives; checked while transformers has Flax."""
  if not hasattr(transformers, 'FlaxViTModel'):
    pytest.skip('transformers >= 5 has no Flax ViT to compare with')
  flax_dir = str(tmp_path / 'dino_flax')
  theirs = transformers.FlaxViTModel.from_pretrained(saved['dino_dir'], from_pt=True,
                                                     add_pooling_layer=False)
  theirs.save_pretrained(flax_dir)
  metrics._dino_processor(32).save_pretrained(flax_dir)
  ours = metrics.load_dino(flax_dir)
  images = [_noise(40, 56, 0), _noise(33, 33, 1, 'L')]
  want = theirs(ours.pixels(images)).last_hidden_state[:, 0]
  np.testing.assert_allclose(ours.embed_images(images), np.asarray(want), atol=1e-5)


def test_metrics_equal_hand_computed_cosines(saved):
  clip, dino = saved['clip'], saved['dino']
  gen = [_noise(32, 32, 10), _noise(64, 48, 11)]
  real = [_noise(50, 40, 20), _noise(30, 45, 21, 'L'), _noise(32, 32, 22)]
  text = clip.embed_texts(['a dog on the beach'])
  g_c, r_c = clip.embed_images(gen), clip.embed_images(real)
  g_d, r_d = dino.embed_images(gen), dino.embed_images(real)
  assert g_c.shape == (2, 16) and g_d.shape == (2, 32)
  np.testing.assert_allclose(metrics.clip_t(text, g_c),
                             [_cos_np(text[0], g) for g in g_c], atol=1e-5)
  for got, g_emb, r_emb in ((metrics.clip_i(g_c, r_c), g_c, r_c),
                            (metrics.dino_i(g_d, r_d), g_d, r_d)):
    want = [np.mean([_cos_np(g, r) for r in r_emb]) for g in g_emb]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_identical_images_score_one(saved):
  im = _noise(40, 30, 5)
  c = saved['clip'].embed_images([im])
  d = saved['dino'].embed_images([im])
  c2 = saved['clip'].embed_images([im, im, im])
  np.testing.assert_allclose(metrics.clip_i(c, c2), [1.0], atol=1e-5)
  np.testing.assert_allclose(metrics.dino_i(d, d), [1.0], atol=1e-5)


def test_mask_fills_background_with_mean_and_changes_scores(saved):
  clip, dino = saved['clip'], saved['dino']
  im = _noise(32, 32, 7)
  empty = np.zeros((32, 32), np.float32)
  # Background = the normalisation mean, so a fully masked image normalises to ~0.
  assert np.abs(dino.pixels([im], [empty])).max() < 0.02
  assert np.abs(clip.pixels([im], [empty])).max() < 0.02
  half = np.zeros((32, 32), np.float32)
  half[:, :16] = 1.0
  masked = np.asarray(metrics.apply_mask(im, half, (0.5, 0.5, 0.5)))
  np.testing.assert_array_equal(masked[:, :16], np.asarray(im)[:, :16])
  assert (masked[:, 16:] == 128).all()
  ref = [_noise(32, 32, 8)]
  for s in (clip, dino):
    plain = metrics.mean_pairwise_cosine(s.embed_images([im]), s.embed_images(ref))
    with_mask = metrics.mean_pairwise_cosine(s.embed_images([im], [half]),
                                             s.embed_images(ref))
    assert abs(float(plain[0]) - float(with_mask[0])) > 1e-3
  with pytest.raises(ValueError, match='mask shape'):
    metrics.apply_mask(im, np.ones((5, 5)), (0, 0, 0))


def test_default_dino_preprocessing_without_config_file(saved, tmp_path):
  bare = tmp_path / 'dino_bare'
  bare.mkdir()
  for name in ('config.json', 'model.safetensors'):
    shutil.copy(os.path.join(saved['dino_dir'], name), bare / name)
  dino = metrics.load_dino(str(bare))
  np.testing.assert_allclose(dino.processor.image_mean, metrics.IMAGENET_MEAN)
  np.testing.assert_allclose(dino.processor.image_std, metrics.IMAGENET_STD)
  # The default size is the model's own (224 for the real ViT-S/16, 32 here).
  assert dino.pixels([_noise(50, 70, 3)]).shape == (1, 3, 32, 32)


def test_missing_weights_name_the_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    metrics.load_dino(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not found'):
    metrics.load_clip(str(tmp_path / 'nope'))
