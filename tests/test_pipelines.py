"""The one door (`pipelines.load_pipeline`): which pipeline a config or a set of files gets.

The release side (a release config, a converted release adapter) is in
tests/test_release_pipeline.py, beside the tiny release it needs.
"""
import pytest

from configs import tiny as tiny_config
from realcustom_jax import adapter as adapter_lib
from realcustom_jax import pipeline as paper_pipeline
from realcustom_jax import pipelines


def test_a_paper_config_gets_the_paper_pipeline_with_the_config_s_settings():
  config = tiny_config.get_config()
  config.sampler.gamma_scope = 0.4
  with pytest.warns(UserWarning, match='UNTRAINED'):
    pipe = pipelines.load_pipeline(config)
  assert type(pipe) is paper_pipeline.RealCustomPipeline  # pylint: disable=unidiomatic-typecheck
  assert float(pipe.settings().gamma_scope) == pytest.approx(0.4)


def test_files_without_a_config_get_the_paper_settings(tiny_pretrained, tmp_path):
  sd_dir, vision_dir = tiny_pretrained
  with pytest.warns(UserWarning, match='UNTRAINED'):
    pipe = pipelines.load_pipeline(pretrained=sd_dir, vision_encoder=vision_dir)
  assert isinstance(pipe, paper_pipeline.RealCustomPipeline)
  assert pipe.schedule().num_steps == 50  # Sec. 4.1
  # The keyword arguments override a config's paths, and its adapter is read.
  path = str(tmp_path / 'adapter.safetensors')
  adapter_lib.save_adapter(path, pipe.adapter_params)
  config = tiny_config.get_config()
  loaded = pipelines.load_pipeline(config, pretrained=sd_dir, vision_encoder=vision_dir,
                                   adapter=path)
  assert config.pretrained == '' and config.adapter == ''  # the caller's config is untouched
  leaf = lambda p: p['scoring']['text_score_net']['dense_0']['kernel']
  assert (leaf(loaded.adapter_params) == leaf(pipe.adapter_params)).all()


@pytest.mark.parametrize('kwargs, message', [
    ({}, 'needs a config'),
    ({'pretrained': '/nonexistent_sd'}, 'needs a config'),
    ({'pretrained': '/nonexistent_sd', 'vision_encoder': '/x', 'adapter': '/no.safetensors'},
     'does not exist'),
])
def test_what_is_missing_is_one_line(kwargs, message):
  with pytest.raises(ValueError, match=message) as e:
    pipelines.load_pipeline(**kwargs)
  assert '\n' not in str(e.value)


def test_missing_weights_are_named_for_either_kind():
  from configs import laion  # pylint: disable=g-import-not-at-top
  from configs import release  # pylint: disable=g-import-not-at-top
  assert '--config.pretrained' in pipelines.missing_weights_message(laion.get_config())
  assert '--pretrained' in pipelines.missing_weights_message(release.get_config())
  assert pipelines.missing_weights_message(tiny_config.get_config()) is None
