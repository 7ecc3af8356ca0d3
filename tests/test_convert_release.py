"""sample.convert_release / release.convert_release_checkpoint: the release's `.pth`
(tests/fixtures/release_unet/realcustom_adapter.pth, saved by the release's own UNet) to
our safetensors adapter, and every way a wrong file is refused in one line."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from realcustom_jax import adapter as adapter_lib
from realcustom_jax.release import convert as release
from realcustom_jax.release import encoder as release_encoder
from realcustom_jax.loading import weights
from realcustom_jax.unet import RealCustomUNet
from tests import release_unet_fixture as fixture

torch = pytest.importorskip('torch')  # writing test .pth files; the converter needs it too

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREFIX = release_encoder.RELEASE_PROJECTOR_PREFIX


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'sample.convert_release', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300)


def _assert_usage_error(proc, *fragments):
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], lines[0]


def _convert(tmp_path, state=None, unet_config=fixture.RELEASE_CONFIG,
             out_name='adapter.safetensors', **kwargs):
  checkpoint = fixture.CHECKPOINT
  if state is not None:
    checkpoint = fixture.save_release_state(state, str(tmp_path / 'edited.pth'),
                                            kwargs.pop('dtype', None))
  out = str(tmp_path / out_name)
  info = release.convert_release_checkpoint(checkpoint, out, allow_pickle=True,
                                            unet_config=unet_config, **kwargs)
  return info, out


def _refused(tmp_path, *fragments, **kwargs):
  with pytest.raises(weights.CheckpointError) as e:
    _convert(tmp_path, **kwargs)
  message = str(e.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message, message


def _unet_config_file(tmp_path, **changes) -> str:
  with open(fixture.RELEASE_CONFIG) as f:
    config = json.load(f)
  config.update(changes)
  path = str(tmp_path / 'config.json')
  with open(path, 'w') as f:
    json.dump(config, f)
  return path


def test_cli_converts_the_release_checkpoint(tmp_path):
  out = tmp_path / 'realcustom.safetensors'
  proc = _cli(f'--checkpoint={fixture.CHECKPOINT}', f'--out={out}', '--allow_pickle',
              f'--unet_config={fixture.RELEASE_CONFIG}')
  assert proc.returncode == 0, proc.stderr
  assert '8 attn2 visual K/V pairs' in proc.stdout and 'float16' in proc.stdout
  metadata = adapter_lib.load_adapter_metadata(str(out))
  adapter_lib.check_adapter_metadata(metadata, 'x', adapter_lib.RELEASE_KIND)
  settings = json.loads(metadata['release_config'])
  assert (settings['vision_dim'], settings['out_dim'], settings['dim_head']) == (32, 32, 16)
  assert settings['cross_attention_layers'] == 8
  assert settings['unet']['transformer_layers_per_block'] == [1, 2]
  assert metadata['source_dtype'] == 'float16'
  # Every release tensor lands, unchanged, where the mapping says.
  state, tree = fixture.release_state(), adapter_lib.load_adapter(str(out))
  unet = RealCustomUNet.from_config(release.read_unet_config(fixture.RELEASE_CONFIG)[0])
  for layer in release.attn2_layers(unet):
    node = tree
    for key in layer.path:
      node = node[key]
    for ours, theirs in release.VISION_KV.items():
      np.testing.assert_array_equal(node[ours]['kernel'],
                                    state.pop(f'{layer.torch_prefix}.{theirs}.weight').T)
  np.testing.assert_array_equal(tree['subject_projector']['projector_base']['kernel'],
                                state[PREFIX + 'projector_base.weight'].T)
  # What is left of the state is the projector's: one tensor per projector leaf.
  assert len(jax.tree_util.tree_leaves(tree['subject_projector'])) == len(state)


def test_cli_refuses_a_pickle_without_allow_pickle(tmp_path):
  out = tmp_path / 'a.safetensors'
  proc = _cli(f'--checkpoint={fixture.CHECKPOINT}', f'--out={out}')
  _assert_usage_error(proc, 'unpickling can run code', 'torch', '--allow_pickle')
  assert not out.exists()


def test_cli_refuses_a_missing_checkpoint(tmp_path):
  proc = _cli(f'--checkpoint={tmp_path / "nope.pth"}', f'--out={tmp_path / "a.safetensors"}',
              '--allow_pickle')
  _assert_usage_error(proc, 'nope.pth', 'no such file')


def test_the_library_refuses_pickles_without_allow_pickle(tmp_path):
  with pytest.raises(weights.CheckpointError, match='unpickling can run code'):
    release.convert_release_checkpoint(fixture.CHECKPOINT, str(tmp_path / 'a.safetensors'),
                                       allow_pickle=False)


def test_a_missing_visual_kv_is_refused(tmp_path):
  state = fixture.release_state()
  key = 'up_blocks.0.attentions.1.transformer_blocks.1.attn2.to_v_vision.weight'
  del state[key]
  _refused(tmp_path, f'lacks {key}', '16 visual K/V tensors', state=state)


def test_a_missing_projector_is_refused(tmp_path):
  state = {k: v for k, v in fixture.release_state().items() if not k.startswith(PREFIX)}
  _refused(tmp_path, f'lacks {PREFIX}min_attention.norm1.weight', state=state)


@pytest.mark.parametrize('changes, fragments', [
    ({}, ('(640, 2048)',)),  # the default: SDXL itself
    (dict(block_out_channels=[32, 64], attention_head_dim=[2, 4]), ('(64, 32)',)),
    (dict(transformer_layers_per_block=[1, 1]), ('this UNet lacks',)),
    (dict(transformer_layers_per_block=[1, 3]), ('lacks', 'of the 24 visual K/V')),
], ids=['sdxl', 'wider', 'shallower', 'deeper'])
def test_a_checkpoint_for_another_unet_is_refused(tmp_path, changes, fragments):
  config = _unet_config_file(tmp_path, **changes) if changes else None
  _refused(tmp_path, *fragments, unet_config=config)


def test_unexpected_tensors_are_refused(tmp_path):
  state = dict(fixture.release_state(), **{'image_encoder.proj.weight': np.ones((2, 2))})
  _refused(tmp_path, 'unexpected', 'image_encoder.proj.weight', state=state)


def test_base_weights_beside_the_adapter_need_skip_base_weights(tmp_path):
  with np.load(os.path.join(fixture.FIXTURE, 'unet_state.npz')) as z:
    base = {k: z[k] for k in ('conv_in.weight', 'conv_in.bias')}
  state = dict(fixture.release_state(), **base)
  _refused(tmp_path, '2 base UNet tensor(s)', '--skip_base_weights', state=state)
  info, out = _convert(tmp_path, state, skip_base_weights=True)
  assert info['skipped_base_tensors'] == 2
  _, plain = _convert(tmp_path, None, out_name='plain.safetensors')
  np.testing.assert_equal(adapter_lib.load_adapter(out), adapter_lib.load_adapter(plain))


def test_a_bfloat16_checkpoint_converts_exactly(tmp_path):
  state = fixture.release_state()
  info, out = _convert(tmp_path, state, dtype=torch.bfloat16)
  assert info['source_dtype'] == 'bfloat16'
  key = 'mid_block.attentions.0.transformer_blocks.0.attn2.to_k_vision.weight'
  want = torch.from_numpy(state[key]).to(torch.bfloat16).float().numpy().T
  got = adapter_lib.load_adapter(out)['unet']['mid_block']['attentions_0'][
      'transformer_blocks_0']['attn2']['to_k_visual']['kernel']
  np.testing.assert_array_equal(got, want)


def test_a_pickle_that_is_not_a_state_dict_is_refused(tmp_path):
  path = str(tmp_path / 'list.pth')
  torch.save([torch.zeros(2)], path)
  with pytest.raises(weights.CheckpointError, match='not a flat state dict'):
    release.convert_release_checkpoint(path, str(tmp_path / 'a.safetensors'),
                                       allow_pickle=True)


def test_release_settings_are_read_from_its_config(tmp_path):
  _refused(tmp_path, 'dim_head 8 contradicts', dim_head=8)
  with open(fixture.RELEASE_CONFIG) as f:
    other = dict(json.load(f)['image_prompt_settings'], image_prompt_mode='none')
  _refused(tmp_path, "image_prompt_mode 'none'",
           unet_config=_unet_config_file(tmp_path, image_prompt_settings=other))
  # A diffusers unet/config.json has no projector settings: the head width is a flag.
  _refused(tmp_path, 'not a multiple of dim_head 64', '--dim_head',
           unet_config=fixture.UNET_CONFIG)
  info, _ = _convert(tmp_path, unet_config=fixture.UNET_CONFIG, dim_head=fixture.DIM_HEAD)
  assert info['dim_head'] == fixture.DIM_HEAD


def test_export_release_state_is_the_converter_inverse_on_the_release_file(tmp_path):
  """The release's own .pth (saved from its own UNet module tree): converted, then
  written back with `export_release_state`, gives its state dict again: the same keys,
  shapes and values (what train.export writes for a release run)."""
  info, out = _convert(tmp_path)
  tree = adapter_lib.load_adapter(out)
  unet = RealCustomUNet.from_config(release.read_unet_config(fixture.RELEASE_CONFIG)[0])
  back = release.export_release_state(tree, unet)
  state = fixture.release_state()
  assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in state.items()}
  for key, value in state.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  again, _ = release.adapter_from_release_state(back, unet, info['dim_head'])
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, again, tree)))
