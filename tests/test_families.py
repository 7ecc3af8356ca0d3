"""Both model families, field by field, on their tiny configs (configs/tiny.py and
configs/release_train_tiny.py): what the callers use instead of asking which model
they hold. The training fields are checked together: the preprocessed record, batched,
is what `abstract_batch` says the step is compiled for."""
import os

import jax
import numpy as np
import pytest

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import family as family_lib
from realcustom_jax import paper_family
from realcustom_jax import pipelines
from realcustom_jax import sampler
from realcustom_jax.runtime import sharding
from train import input_pipeline

B = 8  # one row per fake device


def _paper_config(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.tfds_data_dir = str(tmp_path / 'tfds')
  config.data.toy_num_images = 8
  config.data.batch_size = B
  return config


@pytest.fixture(scope='module')
def release_config(tmp_path_factory):
  pytest.importorskip('torch')  # the tiny release's .pth is written with torch, once
  from configs import release_train_tiny  # pylint: disable=g-import-not-at-top
  config = release_train_tiny.get_config()
  config.tiny_release.dir = str(tmp_path_factory.mktemp('release_tiny'))
  config.data.tfds_data_dir = str(tmp_path_factory.mktemp('tfds'))
  config.data.toy_num_images = 8
  config.data.batch_size = B
  return config


def test_the_family_is_chosen_from_the_config_and_the_adapter(tmp_path):
  from configs import release_tiny, tiny  # pylint: disable=g-import-not-at-top
  assert pipelines.family_for(tiny.get_config()) is paper_family.FAMILY
  release = pipelines.family_for(release_tiny.get_config())
  assert release.name == 'release' and release is pipelines.family_named('release')
  assert pipelines.family_name(None) == 'paper'
  with pytest.raises(ValueError, match=r"config.pipeline must be one of .*got 'sdxl'"):
    pipelines.family_name({'pipeline': 'sdxl'})
  # An adapter file says which family it belongs to.
  path = str(tmp_path / 'a.safetensors')
  adapter_lib.save_adapter(path, {'w': np.zeros((2,), np.float32)},
                           {'adapter_kind': adapter_lib.RELEASE_KIND})
  assert pipelines.adapter_family_name(path) == 'release'
  assert pipelines.adapter_family_name(None) == 'paper'
  for family in (paper_family.FAMILY, release):
    assert isinstance(family, family_lib.Family)
    assert family.title and family.tiny_weights and family.no_adapter
  assert paper_family.FAMILY.supports_precompute and not release.supports_precompute


def test_config_checks_and_missing_weights(tmp_path, release_config):
  paper, release = paper_family.FAMILY, pipelines.family_named('release')
  config = _paper_config(tmp_path)
  assert paper.missing_weights_message(config) is None  # the embedded tiny models
  paper.check_training_config(config)
  config.train.gamma_num_range = (0.9, 0.3)
  with pytest.raises(ValueError, match='gamma_num_range must satisfy'):
    paper.check_training_config(config)
  config = _paper_config(tmp_path)
  config.resolution = 512  # configs/laion.py's size, which the tiny models do not take
  assert '--config.pretrained=DIR' in paper.missing_weights_message(config)
  release.check_training_config(release_config)
  bad = release_config.copy_and_resolve_references()
  bad.train.caption_dropout = 1.5
  with pytest.raises(ValueError, match=r'caption_dropout must lie in \[0, 1\]'):
    release.check_training_config(bad)
  bad = release_config.copy_and_resolve_references()
  bad.pretrained = str(tmp_path / 'nowhere')
  assert '--vision_encoder' in release.missing_weights_message(bad)


def test_target_word_checks(tmp_path):
  paper, release = paper_family.FAMILY, pipelines.family_named('release')
  config = _paper_config(tmp_path)
  paper.check_word(config, 'a toy on the beach', 'toy')
  with pytest.raises(ValueError, match="'cat' does not occur"):
    paper.check_word(config, 'a toy on the beach', 'cat')
  release.check_word(None, 'a toy on the beach', 'toy')
  with pytest.raises(ValueError, match="'Toy' does not occur"):  # str.find: case matters
    release.check_word(None, 'a toy on the beach', 'Toy')


@pytest.mark.parametrize('name, plain, described', [
    ('paper', 7.5, ', soft scope'), ('release', 3.5, ', mask max_norm, reuse on')])
def test_guidance_controls_make_the_settings(name, plain, described):
  from configs import release_tiny, tiny  # pylint: disable=g-import-not-at-top
  config = (tiny if name == 'paper' else release_tiny).get_config()
  controls = pipelines.family_named(name).controls
  values = controls.defaults(config.sampler)
  assert list(values) == controls.names
  settings = controls.settings(config.sampler, values)
  assert isinstance(settings, sampler.GuidanceSettings)
  assert (settings.mask_strategy == 'paper') == (name == 'paper')
  assert controls.plain_scale(settings) == pytest.approx(plain)
  assert controls.describe(settings) == described
  static = [c for c in controls.controls if c.static]
  assert static and all(c.kind in ('slider', 'choice', 'choices') for c in controls.controls)
  # A ratio out of range, through the family's own mapping (gamma_scope / mask_scope).
  scope_name = 'gamma_scope' if name == 'paper' else 'mask_scope'
  with pytest.raises(ValueError, match=r'gamma_scope must lie in \[0, 1\]'):
    controls.settings(config.sampler, dict(values, **{scope_name: 1.5}))
  # Each control changes the settings it names.
  for control in controls.controls:
    if control.kind == 'slider' and control.maximum is not None:
      changed = controls.settings(config.sampler, dict(values, **{control.name: 0.5}))
      assert changed != settings, control.name


@pytest.mark.parametrize('name, message', [
    ('paper', 'Stable Diffusion directory'),
    ('release', 'the release pipeline needs its converted adapter')])
def test_pipelines_load_through_their_own_family(tmp_path, name, message):
  family = pipelines.family_named(name)
  with pytest.raises(ValueError, match=message):
    family.pipeline_from_pretrained(str(tmp_path / 'none'), str(tmp_path / 'none'), None)


def _training_fields(family, config, workdir, tmp_path):
  """Every training field once: components, preprocess, setup, abstract batch, extras,
  export. Returns (abstract batch, batched preprocessed records, exported file)."""
  loaded = family.load_training_components(config)
  source = input_pipeline.get_data_source(config, workdir)
  preprocess = family.train_preprocess(config, loaded)
  records = [preprocess.map(source[i]) for i in range(B)]
  batch = {k: np.stack([r[k] for r in records]) for k in records[0]}
  mesh = sharding.create_mesh(config.mesh)
  setup, shapes = family.setup_training(config, mesh, loaded, with_encoders=True)
  abstract = family.abstract_batch(config, loaded, shapes, B)
  extras = family.checkpoint_extras(loaded)
  checkpoint_config = dict(model=config.model.to_dict(), **extras)
  out = str(tmp_path / f'{family.name}.safetensors')
  written = family.export(jax.device_get(setup.state['params']), checkpoint_config, out, 3)
  assert written[0] == out and os.path.isfile(out)
  return abstract, batch, out, extras


def test_paper_training_fields(tmp_path):
  family = paper_family.FAMILY
  abstract, batch, out, extras = _training_fields(family, _paper_config(tmp_path),
                                                  str(tmp_path / 'work'), tmp_path)
  assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}
  assert extras == {}
  assert pipelines.adapter_family_name(out) == 'paper'
  assert adapter_lib.load_adapter_metadata(out)['step'] == '3'


def test_release_training_fields(tmp_path, release_config):
  family = pipelines.family_named('release')
  abstract, batch, out, extras = _training_fields(family, release_config,
                                                  str(tmp_path / 'work'), tmp_path)
  assert {k: (v.shape, v.dtype) for k, v in abstract.items()} == {
      k: (v.shape, v.dtype) for k, v in batch.items()}
  assert 'time_ids' in batch and 'input_ids_2' in batch
  assert 'release_unet_config' in extras
  assert pipelines.adapter_family_name(out) == 'release'
  with pytest.raises(ValueError, match='lacks release_unet_config'):
    family.export({}, {'model': {}}, str(tmp_path / 'x.safetensors'), 1)


def test_each_family_config_stands_on_its_own():
  """configs/laion.py holds the paper's keys itself (`runlocal`: configs/tiny.py's
  sizes); the release's training config takes the shared sections, not the paper's."""
  from configs import laion, release_train, tiny  # pylint: disable=g-import-not-at-top
  assert laion.get_config('runlocal').to_dict() == tiny.get_config().to_dict()
  paper = laion.get_config()
  assert paper.resolution == 512 and paper.sampler.num_steps == 50
  assert paper.train.num_steps == 160_000 and paper.data.min_aesthetic == 5.0
  with pytest.raises(ValueError, match="takes '' or 'runlocal'"):
    laion.get_config('big')
  release = release_train.get_config()
  for paper_only in ('gamma_num_range', 'image_dropout', 'selection_gradient',
                     'score_supervision'):
    assert paper_only in paper.train and paper_only not in release.train
  assert pipelines.family_for(release).name == 'release'
  assert pipelines.family_for(paper) is paper_family.FAMILY
