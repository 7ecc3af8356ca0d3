"""One place decides where the frozen models come from; the library never reads configs/."""
import os
import re

import pytest

from configs import laion
from configs import tiny as tiny_config
from realcustom_jax.loading import components

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_without_pretrained_and_local_weights_with_it(tiny_pretrained):
  config = tiny_config.get_config()
  sd, vision = components.load_components(config)
  assert sd.unet_config['block_out_channels'] == tuple(config.tiny.unet['block_out_channels'])
  sd_dir, vision_dir = tiny_pretrained
  config.pretrained, config.vision_encoder = sd_dir, vision_dir
  loaded, loaded_vision = components.load_components(config)
  assert loaded.unet_config['cross_attention_dim'] == sd.unet_config['cross_attention_dim']
  assert loaded_vision.num_patches == vision.num_patches
  # The tokenizer is read from the directory without building any model.
  assert components.load_tokenizer(config).model_max_length == 77


@pytest.mark.parametrize('change, message', [
    (dict(pretrained='/nonexistent_sd'), 'vision_encoder'),
    (dict(pretrained='/nonexistent_sd', vision_encoder='/nonexistent_clip'), 'nonexistent_sd'),
])
def test_mistakes_are_one_line_value_errors(change, message):
  config = tiny_config.get_config()
  config.update(change)
  with pytest.raises(ValueError, match=message) as e:
    components.load_components(config)
  assert '\n' not in str(e.value)


def test_a_config_for_real_weights_without_them_names_the_keys():
  with pytest.raises(ValueError, match='--config.pretrained'):
    components.load_components(laion.get_config())


def test_the_library_does_not_import_configs():
  pattern = re.compile(r'^\s*(from configs\b|import configs\b)', re.M)
  folder = os.path.join(REPO, 'realcustom_jax')
  offenders = [name for name in sorted(os.listdir(folder)) if name.endswith('.py')
               and pattern.search(open(os.path.join(folder, name)).read())]
  assert not offenders, offenders


def test_missing_weights_message_names_the_keys():
  message = components.missing_weights_message(laion.get_config())
  assert '--config.pretrained' in message and '--config.vision_encoder' in message
  assert 'configs/laion.py' in message and '\n' not in message
  assert components.missing_weights_message(tiny_config.get_config()) is None
  with_weights = laion.get_config()
  with_weights.pretrained = '/models/sd15'
  assert components.missing_weights_message(with_weights) is None
