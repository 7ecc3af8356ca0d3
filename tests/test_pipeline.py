"""RealCustomPipeline end to end on the tiny embedded models (and a real on-disk layout)."""
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny as tiny_config
from realcustom_jax import pipeline as pipeline_lib
from realcustom_jax import pipeline_common
from realcustom_jax import adapter as adapter_lib

STEPS = 3
PROMPTS = ['a toy on the beach', 'a photo of a red dog in the park']
WORDS = ['toy', 'dog']


def _subject(seed=0, size=(40, 56)):
  rng = np.random.RandomState(seed)
  return Image.fromarray((rng.rand(size[0], size[1], 3) * 255).astype(np.uint8))


def _pixels(out):
  return np.stack([np.asarray(im) for im in out.images])


@pytest.fixture(scope='module')
def config():
  c = tiny_config.get_config()
  c.sampler.num_steps = STEPS
  return c


def _with_adapter(config, path):
  config = config.copy_and_resolve_references()
  config.adapter = path
  return config


@pytest.fixture(scope='module')
def pipe(config):
  with pytest.warns(UserWarning, match='UNTRAINED adapter'):
    return pipeline_lib.RealCustomPipeline.from_config(config)


@pytest.fixture(scope='module')
def first(pipe):
  return pipe([_subject()], PROMPTS, WORDS, seed=0, return_masks=True)


def test_generates_images_and_masks(pipe, config, first):
  assert len(first.images) == len(PROMPTS)
  for im in first.images:
    assert im.mode == 'RGB' and im.size == (config.resolution, config.resolution)
  latent = config.resolution // pipe.components.vae_scale_factor
  assert first.masks.shape == (STEPS, len(PROMPTS), latent, latent)
  assert first.x0.shape == (STEPS, len(PROMPTS), config.resolution, config.resolution, 3)
  assert first.x0.dtype == np.uint8
  k = int(config.sampler.gamma_scope * latent * latent)
  assert np.all(np.count_nonzero(first.masks, axis=(2, 3)) == k)
  # The two prompts give two different images (not a broadcast of one row).
  assert not np.array_equal(*_pixels(first))


def test_deterministic_per_seed(pipe, first):
  again = pipe([_subject()], PROMPTS, WORDS, seed=0, return_masks=True)
  np.testing.assert_array_equal(_pixels(again), _pixels(first))
  other = pipe([_subject()], PROMPTS, WORDS, seed=1, return_masks=True)
  assert not np.array_equal(_pixels(other), _pixels(first))


def test_subject_changes_output_and_broadcasts(pipe, first):
  # One subject per prompt, the same one twice, equals one shared subject.
  # (The vision encoder then runs at batch 2 instead of 1: float32 rounding may move a
  # pixel by one level, no more.)
  pair = pipe([_subject(), _subject()], PROMPTS, WORDS, seed=0, return_masks=True)
  np.testing.assert_allclose(_pixels(pair).astype(int), _pixels(first).astype(int), atol=1)
  other = pipe([_subject(7)], PROMPTS, WORDS, seed=0, return_masks=True)
  assert np.abs(_pixels(other).astype(int) - _pixels(first).astype(int)).max() > 1


def test_save_mask_grid(first, tmp_path):
  path = tmp_path / 'grid.png'
  pipeline_common.save_mask_grid(first, str(path), steps=[0, STEPS - 1])
  grid = Image.open(path)
  assert grid.size == (2 * 64, 2 * 64)  # tiles upscaled to 64 px: 2 steps x (mask, x0)
  # The top-left tile is the step-0 mask: grey levels with black outside the scope.
  top = np.asarray(grid)[:64, :64, 0]
  assert top.min() == 0 and top.max() == 255
  with pytest.raises(ValueError, match='return_masks'):
    pipeline_common.save_mask_grid(pipeline_common.RealCustomOutput(first.images), str(path))


def test_word_not_in_prompt(pipe):
  with pytest.raises(ValueError, match=r"'cat'.*'a toy on the beach'"):
    pipe([_subject()], ['a toy on the beach'], ['cat'])


@pytest.mark.parametrize('subjects,prompts,words', [
    (1, PROMPTS, ['toy']),
    (3, PROMPTS, WORDS),
])
def test_mismatched_lengths(pipe, subjects, prompts, words):
  with pytest.raises(ValueError, match='need one'):
    pipe([_subject()] * subjects, prompts, words)


def test_bad_gamma(pipe):
  with pytest.raises(ValueError, match='gamma_scope'):
    pipe([_subject()], PROMPTS, WORDS, gamma_scope=1.2)


def _perturbed_adapter(pipe):
  """A stand-in for a trained adapter: every adapter weight moved by noise."""
  adapter = pipe.adapter_params
  leaves, tree = jax.tree_util.tree_flatten(adapter)
  keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + 0.5 * jnp.std(x) * jax.random.normal(k, x.shape) + 0.05
             for x, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def adapter_file(pipe, tmp_path_factory):
  """A stand-in for a trained adapter, saved with adapter_lib.save_adapter."""
  path = str(tmp_path_factory.mktemp('adapter') / 'adapter.safetensors')
  trained = _perturbed_adapter(pipe)
  adapter_lib.save_adapter(path, trained, {'note': 'test'})
  return path, trained


def test_adapter_file_round_trip(pipe, config, first, adapter_file):
  path, trained = adapter_file
  in_memory = pipeline_lib.RealCustomPipeline(pipe.components, pipe.vision, config,
                                              adapter_params=trained)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # a given adapter means no "untrained" warning
    loaded = pipeline_lib.RealCustomPipeline(pipe.components, pipe.vision, config,
                                             adapter_params=adapter_lib.load_adapter(path))
  a = loaded([_subject()], PROMPTS, WORDS, seed=0, return_masks=True)
  b = in_memory([_subject()], PROMPTS, WORDS, seed=0, return_masks=True)
  np.testing.assert_array_equal(_pixels(a), _pixels(b))
  assert not np.array_equal(_pixels(a), _pixels(first))


def test_adapter_that_does_not_fit(pipe, config, tmp_path):
  path = str(tmp_path / 'bad.safetensors')
  adapter_lib.save_adapter(path, {'scoring': {'w': np.zeros((3,), np.float32)}})
  with pytest.raises(ValueError, match='adapter does not fit'):
    pipeline_lib.RealCustomPipeline(pipe.components, pipe.vision, config,
                                    adapter_params=adapter_lib.load_adapter(path))


def test_from_pretrained_on_disk_layout(config, adapter_file, tiny_pretrained):
  sd_dir, vision_dir = tiny_pretrained
  with pytest.warns(UserWarning, match='UNTRAINED'):
    untrained = pipeline_lib.RealCustomPipeline.from_pretrained(sd_dir, vision_dir,
                                                                config=config)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    trained = pipeline_lib.RealCustomPipeline.from_pretrained(
        sd_dir, vision_dir, adapter_path=adapter_file[0], config=config)
  a = untrained([_subject()], PROMPTS[:1], WORDS[:1], seed=3)
  b = trained([_subject()], PROMPTS[:1], WORDS[:1], seed=3)
  assert len(a.images) == 1 and a.images[0].size == (config.resolution,) * 2
  assert np.asarray(a.images[0]).std() > 0  # not a blank image
  assert not np.array_equal(_pixels(a), _pixels(b))


def test_without_a_config_real_weights_get_the_paper_settings(config, tiny_pretrained):
  sd_dir, vision_dir = tiny_pretrained
  with pytest.warns(UserWarning, match='UNTRAINED'):
    pipe = pipeline_lib.RealCustomPipeline.from_pretrained(sd_dir, vision_dir)
  s = pipe.config.sampler
  assert (s.num_steps, s.guidance_text, s.guidance_image, s.gamma_scope, s.gamma_num) == (
      50, 7.5, 12.5, 0.25, 0.8)
  # What a call without overrides uses, and the UNet sample size times the VAE factor.
  settings = pipe.settings()
  assert pipe.schedule().num_steps == 50
  assert (float(settings.guidance_text), float(settings.guidance_image),
          float(settings.gamma_scope), float(settings.gamma_num)) == pytest.approx(
              (7.5, 12.5, 0.25, 0.8))
  assert pipe.resolution == config.resolution
  assert pipe.config.model.dtype == 'float32'  # CPU


def _write_old_adapter(path, params, metadata):
  """An adapter file as versions before the layout number wrote them."""
  import flax  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  safetensors.numpy.save_file({k: np.asarray(v) for k, v in flat.items()}, path,
                              metadata=metadata)


@pytest.mark.parametrize('layout', [None, '1'])
def test_adapter_of_the_old_layout_is_refused(pipe, config, tmp_path, layout):
  """Layout 1 (Eq. 9 before the LayerNorm) has the same shapes: only its number tells."""
  path = str(tmp_path / 'old.safetensors')
  metadata = {'model_config': json.dumps(dict(config.model))}
  if layout is not None:
    metadata['adapter_layout'] = layout
  _write_old_adapter(path, pipe.adapter_params, metadata)
  with pytest.raises(ValueError, match='layout 1 .Eq. 9 before the visual projection'):
    pipeline_lib.RealCustomPipeline.from_config(_with_adapter(config, path))


def test_adapter_trained_without_scoring_is_refused_by_an_adaptive_config(pipe, config,
                                                                         tmp_path):
  path = str(tmp_path / 'none.safetensors')
  adapter_lib.save_adapter(path, pipe.adapter_params,
                           {'model_config': json.dumps({'scoring': 'none'})})
  with pytest.raises(ValueError, match="model.scoring='none'"):
    pipeline_lib.RealCustomPipeline.from_config(_with_adapter(config, path))


def test_adapter_trained_with_another_fusion_is_refused(pipe, config, tmp_path):
  """Shapes cannot tell a Table 3 fusion ablation apart: the stored config must."""
  path = str(tmp_path / 'text_fusion.safetensors')
  model_config = json.dumps({'fusion': 'text', 'scoring_hidden': config.model.scoring_hidden})
  adapter_lib.save_adapter(path, pipe.adapter_params, {'model_config': model_config})
  with pytest.raises(ValueError, match="model.fusion='text'"):
    pipeline_lib.RealCustomPipeline.from_config(_with_adapter(config, path))


def test_adapter_trained_with_sigmoid_scores_needs_the_same_setting(pipe, config, tmp_path):
  path = str(tmp_path / 'sigmoid.safetensors')
  trained = dict(config.model.to_dict(), score_normalization='sigmoid')
  adapter_lib.save_adapter(path, pipe.adapter_params,
                           {'model_config': json.dumps(trained)})
  with pytest.raises(ValueError, match="model.score_normalization='sigmoid'"):
    pipeline_lib.RealCustomPipeline.from_config(_with_adapter(config, path))
  loaded = pipeline_lib.RealCustomPipeline.from_config(_sigmoid_with(config, path))
  assert loaded.model.score_normalization == 'sigmoid'
  # A file from before the key existed was trained with the paper's softmax.
  old = str(tmp_path / 'old.safetensors')
  adapter_lib.save_adapter(old, pipe.adapter_params, {'model_config': json.dumps(
      {k: v for k, v in config.model.to_dict().items() if k != 'score_normalization'})})
  with pytest.raises(ValueError, match="score_normalization='softmax'"):
    pipeline_lib.RealCustomPipeline.from_config(_sigmoid_with(config, old))


def _sigmoid_with(config, path):
  c = _with_adapter(config, path)
  c.model.score_normalization = 'sigmoid'
  return c
