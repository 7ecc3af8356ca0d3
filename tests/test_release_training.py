"""Training the release's architecture (release/training.py through train/train.py) on
tiny random SDXL + tiny ViTs: it learns, only the adapter moves, fine-tuning starts from
the converted file, resume is bit-identical, 8 devices = 1, export round-trips."""
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image
import safetensors.numpy

from realcustom_jax import adapter as adapter_lib
from realcustom_jax.release import convert
from realcustom_jax.release import pipeline as release_pipeline
from realcustom_jax.release import training as release_training
from realcustom_jax.runtime import sharding
from realcustom_jax import training_inputs
from realcustom_jax.unet import RealCustomUNet
from train import export
from train import input_pipeline
from train import train

pytest.importorskip('torch')  # the tiny release's .pth is written with torch, once

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 8  # one row per fake device


@pytest.fixture(scope='module')
def dirs(tmp_path_factory):
  """(tiny release folder, tfds dir), shared by the module's runs."""
  from realcustom_jax.release import tiny as tiny_release  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path_factory.mktemp('release_tiny'))
  tiny_release.write_tiny_release(folder, _config_raw().tiny_release)
  return folder, str(tmp_path_factory.mktemp('tfds'))


def _config_raw():
  from configs import release_train_tiny  # pylint: disable=g-import-not-at-top
  return release_train_tiny.get_config()


def _config(dirs, **overrides):
  config = _config_raw()
  folder, data_dir = dirs
  config.update_from_flattened_dict({
      'tiny_release.dir': folder, 'data.tfds_data_dir': data_dir,
      # The pod layout of the 8 fake devices: frozen SDXL and adapter split over fsdp.
      'data.toy_num_images': 16, 'data.batch_size': B, 'mesh.data': 4, 'mesh.fsdp': 2,
      'train.num_steps': 4, 'train.checkpoint_every': 2, **overrides})
  return config


def _ckpt_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, train.CHECKPOINT_DIR))
                if d.isdigit())


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, dirs):
  workdir = str(tmp_path_factory.mktemp('straight'))
  state = train.train_and_evaluate(_config(dirs), workdir)
  return workdir, jax.device_get(state['params'])


@pytest.fixture(scope='module')
def components(dirs):
  return release_training.load_components(_config(dirs))


@pytest.fixture(scope='module')
def fixed_batch(dirs):
  """One loader batch of the generated set (B rows), as the loop feeds it."""
  config = _config(dirs)
  comps = release_training.load_components(config)
  source = input_pipeline.get_data_source(config, dirs[1])
  loader = input_pipeline.create_train_loader(
      config, source, None, preprocess=release_training.SDXLTrainPreprocess(
          lambda c: training_inputs.tokenize_caption(comps.sdxl.tokenizer, c),
          lambda c: training_inputs.tokenize_caption(comps.sdxl.tokenizer_2, c),
          config.resolution))
  return next(iter(loader))


def _mesh(n):
  if n == 1:
    return sharding.create_mesh({'data': 1, 'fsdp': 1}, devices=jax.devices()[:1])
  return sharding.create_mesh({'data': 4, 'fsdp': 2})  # as _config's mesh


# ---- The loop ----


def test_run_trains_only_the_release_adapter(straight_run, components):
  workdir, params = straight_run
  assert _ckpt_steps(workdir) == [2, 4]
  # Exactly the release's tensors: every attn2's visual K/V and the projector.
  unet = RealCustomUNet.from_config(components.sdxl.unet_config)
  layers = convert.attn2_layers(unet)
  assert set(params) == {'unet', 'subject_projector'}
  kv = jax.tree_util.tree_leaves_with_path(params['unet'])
  assert len(kv) == 2 * len(layers)
  assert all(jax.tree_util.keystr(p).split("'")[-4] in adapter_lib.VISUAL_KV for p, _ in kv)
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    losses = [json.loads(line)['loss'] for line in f]
  assert len(losses) == 4 and all(np.isfinite(losses))


def test_resume_is_bit_identical(straight_run, dirs, tmp_path):
  _, straight = straight_run
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(dirs, **{'train.num_steps': 3}), workdir)
  shutil.rmtree(os.path.join(workdir, train.CHECKPOINT_DIR, '3'))  # died before saving 3
  resumed = jax.device_get(train.train_and_evaluate(_config(dirs), workdir)['params'])
  same = jax.tree.map(np.array_equal, straight, resumed)
  assert all(jax.tree.leaves(same)), 'resumed adapter differs from the straight run'


# ---- The step ----


def _setup(dirs, components, mesh, **overrides):
  config = _config(dirs, **overrides)
  setup, _ = release_training.setup_training(config, mesh, components)
  return config, setup


def test_loss_falls_on_a_fixed_batch(dirs, components, fixed_batch):
  """30 steps on one batch; the loss at steps 0-3's draws (t, eps, z_0, dropout) before
  and after, so the comparison is free of the draws' noise. The tiny config's settings
  (the program the 8-device test compares against)."""
  mesh = _mesh(1)
  _, setup = _setup(dirs, components, mesh)
  step = setup.train_step(fixed_batch)
  batch = sharding.shard_batch(fixed_batch, mesh)
  state0 = jax.device_get(setup.state)

  def loss_at_draws(params, s):  # the step's loss (before its update) at step s's draws
    state = dict(state0, params=params, step=np.int32(s))
    return float(step(sharding.device_put_tree(state, setup.state_sharding), setup.frozen,
                      batch)[1]['loss'])

  before = [loss_at_draws(state0['params'], s) for s in range(4)]
  state = setup.state
  for _ in range(30):
    state, _ = step(state, setup.frozen, batch)
  params = jax.device_get(state['params'])
  after = [loss_at_draws(params, s) for s in range(4)]
  print(f'loss at fixed draws: {np.mean(before):.4f} -> {np.mean(after):.4f}')
  assert np.mean(after) < 0.92 * np.mean(before), (before, after)


def test_every_trainable_leaf_gets_gradient_and_no_frozen_leaf_moves(
    dirs, components, fixed_batch):
  """With optax.identity the update IS the gradient: every adapter leaf's is nonzero;
  the frozen trees (SDXL, VAE, both text encoders, both ViTs) are bitwise unchanged."""
  config = _config(dirs, **{'train.caption_dropout': 0.0, 'train.subject_dropout': 0.0,
                            'train.both_dropout': 0.0})
  models, step_config = release_training.build_models(config, components)
  setup, _ = release_training.setup_training(config, _mesh(1), components)
  frozen_before = jax.device_get(setup.frozen)
  params = jax.device_get(setup.state['params'])
  optimizer = optax.identity()
  state = dict(setup.state, opt_state=optimizer.init(setup.state['params']))
  new, _ = jax.jit(lambda s, f, b: release_training.train_step(
      s, f, b, models=models, step_config=step_config, optimizer=optimizer))(
          state, setup.frozen, fixed_batch)
  grads = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                       jax.device_get(new['params']), params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)
  frozen_after = jax.device_get(setup.frozen)
  assert set(frozen_after) == {'unet', 'vae', 'text', 'vision', 'null'}
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, frozen_before, frozen_after)))


def test_eight_devices_give_the_single_device_step(dirs, components, fixed_batch):
  """1 device against the 4 x 2 (data x fsdp) mesh of the runs above: the same loss and
  gradient norm, and the same update. AdamW's first update is about lr * g / |g| per
  element, so an element whose gradient is near zero turns summation-order noise into
  a step of up to lr: the update is compared to a tenth of lr."""
  results = []
  for n in (1, 8):
    mesh = _mesh(n)
    config, setup = _setup(dirs, components, mesh)
    state, metrics = setup.train_step(fixed_batch)(setup.state, setup.frozen,
                                                   sharding.shard_batch(fixed_batch, mesh))
    results.append((jax.device_get(state['params']), jax.device_get(metrics)))
  (one, m1), (many, m8) = results
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(float(m1[key]), float(m8[key]), rtol=1e-5, err_msg=key)
  close = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one, many)
  assert max(jax.tree.leaves(close)) <= 0.1 * config.train.learning_rate, close
  specs = [x.sharding.spec for x in jax.tree.leaves(state['params'])]
  assert any(sharding.FSDP_AXIS in tuple(s) for s in specs)


def test_fine_tuning_starts_from_the_converted_adapter(dirs, components):
  adapter_file = os.path.join(dirs[0], 'adapter.safetensors')
  _, setup = _setup(dirs, components, _mesh(1), init_adapter=adapter_file)
  start = jax.device_get(setup.state['params'])
  stored = adapter_lib.load_adapter(adapter_file)
  chex.assert_trees_all_equal_structs(start, stored)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(start), jax.tree.leaves(stored)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b.astype(np.float32), err_msg=jax.tree_util.keystr(path))
  # From scratch instead: every visual K/V starts as its layer's text K/V.
  _, scratch = _setup(dirs, components, _mesh(1))
  k = jax.device_get(scratch.state['params'])['unet']['up_blocks_0']['attentions_0'][
      'transformer_blocks_0']['attn2']['to_k_visual']['kernel']
  text_k = components.sdxl.unet_params['up_blocks_0']['attentions_0'][
      'transformer_blocks_0']['attn2']['to_k']['kernel']
  np.testing.assert_array_equal(k, np.asarray(text_k))


# ---- Conditioning ----


def test_reference_pixels_are_the_release_pipelines():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
  ours = release_training.reference_pixels(jnp.asarray(image / 127.5 - 1.0)[None], 56)
  want = release_pipeline.reference_pixels(Image.fromarray(image), 56)
  np.testing.assert_allclose(np.asarray(ours[0]), want, atol=1e-6, rtol=0)


def test_condition_dropout_rates():
  step_config = release_training.ReleaseStepConfig(base=None, caption_dropout=0.1,
                                                    subject_dropout=0.2, both_dropout=0.3)
  caption, subject = map(np.asarray, release_training.condition_dropout(
      jax.random.PRNGKey(0), 200_000, step_config))
  for got, want in (((caption & ~subject).mean(), 0.1), ((subject & ~caption).mean(), 0.2),
                    ((caption & subject).mean(), 0.3)):
    assert abs(got - want) < 0.005, (got, want)


# ---- Mistakes ----


@pytest.mark.parametrize('overrides, message', [
    ({'train.caption_dropout': 0.5, 'train.subject_dropout': 0.4,
      'train.both_dropout': 0.2}, 'at most 1'),
    ({'train.subject_dropout': -0.1}, r'config.train.subject_dropout must lie in \[0, 1\]'),
    ({'init_adapter': '/no/such.safetensors'}, 'config.init_adapter=/no/such.safetensors'),
    ({'model.scoring': 'adaptive'}, "scoring='none'"),
    ({'data.precompute_features': True}, 'not implemented for the release'),
])
def test_bad_values_are_one_line_config_errors(dirs, tmp_path, overrides, message):
  with pytest.raises(train.ConfigError, match=message) as e:
    train.validate_config(_config(dirs, **overrides))
  assert '\n' not in str(e.value)


def test_paper_adapter_as_init_is_refused(dirs, tmp_path):
  path = str(tmp_path / 'paper.safetensors')
  adapter_lib.save_adapter(path, {'visual_proj': {'bias': np.zeros(2, np.float32)}})
  with pytest.raises(train.ConfigError, match='this model needs the authors'):
    train.validate_config(_config(dirs, init_adapter=path))


def test_main_bad_value_exits_2_with_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'train.main', '--config=configs/release_train_tiny.py',
       f'--workdir={tmp_path}', '--config.train.both_dropout=2'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      'error: config.train.both_dropout must lie in [0, 1], got 2.0']


# ---- Export ----


def test_export_round_trips_through_the_converter(straight_run, components, dirs, tmp_path):
  """Ours and the release's layout; the converter maps the latter back to identical
  tensors, with the keys and shapes of the release's .pth; the release pipeline (what
  sample.main --config=configs/release_tiny.py --adapter=... builds) takes ours."""
  workdir, params = straight_run
  out = str(tmp_path / 'adapter.safetensors')
  release_out = export.release_layout_path(out)
  assert export.export(workdir, out, release_out=release_out) == 4
  ours = adapter_lib.load_adapter(out)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, ours, params)))
  metadata = adapter_lib.load_adapter_metadata(out)
  adapter_lib.check_adapter_metadata(metadata, out, adapter_lib.RELEASE_KIND)
  assert metadata['step'] == '4'

  state = safetensors.numpy.load_file(release_out)
  import torch  # pylint: disable=g-import-not-at-top
  pth = torch.load(os.path.join(dirs[0], 'realcustom_tiny.pth'), weights_only=True)
  assert {k: tuple(v.shape) for k, v in state.items()} == {
      k: tuple(v.shape) for k, v in pth.items()}
  unet = RealCustomUNet.from_config(components.sdxl.unet_config)
  back, _ = convert.adapter_from_release_state(state, unet, _config_raw().model.release_dim_head)
  chex.assert_trees_all_equal_structs(back, params)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, back, params)))

  config = _config(dirs, adapter=out)
  pipe = release_pipeline.ReleasePipeline.from_config(config)
  np.testing.assert_array_equal(
      np.asarray(pipe.params['subject_projector']['projector_base']['kernel']),
      params['subject_projector']['projector_base']['kernel'])
