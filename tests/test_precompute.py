"""Precomputed encoder features: stored = in-step encoders, same step, cache reuse, the loop.

One toy set of 12 images (batch 8: the encoder pass pads its last batch) and its float16
features are prepared once for the module. The step comparison, the benchmark's test
and the training run use the same steps (8 fake devices, batch 8, tiny config), which
compile once (persistent compilation cache).
"""
import dataclasses
import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import precompute_speed as precompute_benchmark
from configs import tiny as tiny_config
from realcustom_jax.runtime import sharding
from realcustom_jax import training_inputs
from realcustom_jax.loading import tiny
from realcustom_jax import adapter_training as training
from train import input_pipeline
from train import precompute
from train import prepare
from train import train
from tests import testing

NUM_IMAGES, BATCH = 12, 8
ROWS = [3, 10]  # record 10 lies in the pass's padded last batch


def _config(data_dir):
  return testing.toy_train_config(data_dir, NUM_IMAGES, BATCH,
                                  **{'data.precompute_features': True, 'train.log_every': 1})


@pytest.fixture(scope='module')
def components(tiny_components):
  return tiny_components


@pytest.fixture(scope='module')
def prepared(tmp_path_factory, components):
  data_dir = tmp_path_factory.mktemp('tfds')
  config = _config(data_dir)
  features = precompute.get_feature_source(config, data_dir, *components)
  builder = input_pipeline.get_data_builder(config, data_dir)
  return config, features, builder


def _images(builder, sd, rows) -> dict:
  """The loader's own preprocessing of records `rows`, stacked."""
  source = builder.as_data_source(split='train')
  pre = training_inputs.TrainPreprocess(
      functools.partial(training_inputs.tokenize_caption, sd.tokenizer))
  items = [pre.map(source[i]) for i in rows]
  return {k: np.stack([x[k] for x in items]) for k in items[0]}


def _features(features, rows) -> dict:
  decode = precompute.DecodeFeatures(features.layout)
  items = [decode.map(features[i]) for i in rows]
  return {k: np.stack([x[k] for x in items]) for k in items[0]}


def test_stored_features_equal_the_in_step_encoders(prepared, components):
  config, features, builder = prepared
  sd, vision = components
  assert len(features) == NUM_IMAGES
  stored = _features(features, ROWS)
  assert all(v.dtype == np.float16 for v in stored.values())
  models, _ = training.build_models(config, sd, vision)
  encode = jax.jit(functools.partial(training.encode_features, models=models))
  frozen = {'vae': sd.vae_params, 'text': sd.text_params, 'vision': vision.params}
  rng = jax.random.PRNGKey(3)
  f = encode(frozen, _images(builder, sd, ROWS))
  to_z = lambda f: training.sample_latents(f['latent_mean'], f['latent_std'], rng,
                                           models.scaling_factor)
  as_f32 = lambda f: (to_z(f), np.asarray(f['text'], np.float32),
                      np.asarray(f['image'], np.float32))
  live = as_f32(f)
  # The same rng draws the same eps from the stored posterior as from the live one.
  from_store = as_f32(stored)
  chex.assert_trees_all_close(from_store, live, rtol=2e-3, atol=2e-3)  # float16 rounding
  # That tolerance tells records apart: the stored rows are those records, in order.
  swapped = _features(features, ROWS[::-1])
  assert np.abs(swapped['image'].astype(np.float32) - np.asarray(live[2])).max() > 0.1
  assert np.asarray(stored['latent_std']).min() > 0


@pytest.fixture(scope='module')
def step_setup(prepared, components):
  """Training's set-up on the config's mesh (8 devices), and records 0-7 as images and
  as features."""
  config, features, builder = prepared
  setup, _ = training.setup_training(config, sharding.create_mesh(config.mesh), *components)
  rows = list(range(BATCH))
  return setup, _images(builder, components[0], rows), _features(features, rows)


def _step(setup, batch, precomputed, state=None):
  state = jax.tree.map(jnp.copy, setup.state if state is None else state)  # donated
  frozen = {'unet': setup.frozen['unet']} if precomputed else setup.frozen
  placed = sharding.device_put_tree(batch, setup.batch_sharding(batch))
  return jax.device_get(setup.train_step(batch, precomputed)(state, frozen, placed))


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_precomputed_step_matches_the_in_step_one(step_setup):
  setup, images, feats = step_setup
  (live, m_live), (pre, m_pre) = _step(setup, images, False), _step(setup, feats, True)
  assert int(pre['step']) == int(live['step']) == 1
  # Same eps, t, gamma_num and dropout: the loss differs only by the float16 storage.
  np.testing.assert_allclose(m_pre['loss'], m_live['loss'], rtol=1e-4)
  # The gradients: AdamW's first moment after one step is (1 - b1) * gradient.
  mu = lambda state: _flat(state['opt_state'][-1][0].mu)
  np.testing.assert_allclose(mu(pre), mu(live), atol=1e-3 * np.abs(mu(live)).max())
  # The update itself: Adam's first step is lr * g / |g|, so coordinates with a gradient
  # near zero may flip; nearly all agree to 1% of the largest.
  init = _flat(jax.device_get(setup.state['params']))
  du_live, du_pre = _flat(live['params']) - init, _flat(pre['params']) - init
  assert np.abs(du_live).max() > 0
  agree = np.abs(du_pre - du_live) <= 1e-2 * np.abs(du_live).max()
  assert agree.mean() > 0.99, agree.mean()
  # Another step's draws move the loss far more than the tolerance above (a wrong eps
  # would not pass it).
  later = dict(jax.device_get(setup.state), step=np.asarray(7, np.int32))
  _, m_other = _step(setup, feats, True, state=later)
  assert abs(float(m_other['loss']) - float(m_live['loss'])) > 20 * 1e-4 * float(m_live['loss'])


def test_benchmark_runs_at_tiny_size_and_reports_a_speedup():
  # On the 8 devices at batch 8: the steps compiled above (persistent compilation cache).
  r = precompute_benchmark.run(tiny_config.get_config(), 'tiny', 'float32', 'float16',
                               batch=BATCH, steps=2, warmup=1, rounds=1, num_devices=8)
  assert r['benchmark'] == 'precompute' and r['batch'] == BATCH
  assert r['in_step_steps_per_sec'] > 0 and r['precomputed_steps_per_sec'] > 0
  ratio = r['precomputed_steps_per_sec'] / r['in_step_steps_per_sec']
  assert abs(r['speedup'] - ratio) < 1e-3 * ratio
  assert r['compile_s_in_step'] > 0 and r['compile_s_precomputed'] > 0
  assert r['batch_bytes_precomputed'] < r['batch_bytes_in_step']
  with pytest.raises(ValueError, match='--steps'):
    precompute_benchmark.run(tiny_config.get_config(), 'tiny', 'float32', 'float16',
                             batch=2, steps=0, warmup=1)


def test_rerun_reuses_the_stored_features(prepared, monkeypatch, tmp_path):
  config, features, _ = prepared
  records = features.path / precompute.RECORDS_FILE
  mtime = os.path.getmtime(records)

  def no_encoding(*args, **kwargs):
    raise AssertionError('the encoders ran again')
  monkeypatch.setattr(training, 'encode_features', no_encoding)
  # What `python -m train.prepare` runs: it loads the models anew, same key.
  again = prepare.prepare_features(config, str(tmp_path))
  assert again.path == features.path and os.path.getmtime(records) == mtime
  meta = json.loads((features.path / precompute.META_FILE).read_text())
  assert meta['num_records'] == NUM_IMAGES
  assert os.path.getsize(records) >= NUM_IMAGES * precompute.record_bytes(features.layout)


def _scaled(tree, name, factor):
  """`tree` with its first kernel whose path holds `name` multiplied by `factor`."""
  done = []
  def f(path, x):
    key = jax.tree_util.keystr(path)
    if not done and name in key and 'bias' not in key and np.abs(x).max() > 0:
      done.append(path)
      return x * factor
    return x
  out = jax.tree_util.tree_map_with_path(f, tree)
  assert done, name
  return out


@pytest.mark.parametrize('change', ['feature_dtype', 'frozen_dtype', 'vae', 'text',
                                    'vision', 'vision_resize', 'tokenizer'])
def test_anything_the_features_depend_on_changes_the_key(prepared, components, change):
  config, features, builder = prepared
  sd, vision = components
  base = precompute.features_dir(builder.data_dir, precompute.cache_key(config, sd, vision))
  assert base == features.path
  config = config.copy_and_resolve_references()
  if change == 'feature_dtype':
    config.data.feature_dtype = 'bfloat16'
  elif change == 'frozen_dtype':
    config.train.frozen_dtype = 'bfloat16'
  elif change == 'vae':
    sd = dataclasses.replace(sd, vae_params=_scaled(sd.vae_params, "['encoder']", 1.001))
  elif change == 'text':
    sd = dataclasses.replace(sd, text_params=_scaled(sd.text_params, 'final_layer_norm', 2))
  elif change == 'vision':
    vision = dataclasses.replace(vision, params=_scaled(vision.params, 'patch_embedding', 2))
  elif change == 'vision_resize':
    vision = dataclasses.replace(vision, resize_size=vision.resize_size + 8)
  else:
    tokenizer = tiny.build_tokenizer(tiny.TINY_WORDS + ('zebra',))
    sd = dataclasses.replace(sd, tokenizer=tokenizer)
  changed = precompute.features_dir(builder.data_dir, precompute.cache_key(config, sd, vision))
  assert changed != base and changed.parent == base.parent


def test_the_vae_decoder_is_not_part_of_the_key(prepared, components):
  """A new decoder (sd-vae-ft-mse fine-tunes only that) leaves the features valid."""
  config, features, builder = prepared
  sd, vision = components
  sd = dataclasses.replace(sd, vae_params=_scaled(sd.vae_params, "['decoder']", 2))
  key = precompute.cache_key(config, sd, vision)
  assert precompute.features_dir(builder.data_dir, key) == features.path


def test_new_weights_prepare_new_features(prepared, components):
  config, features, _ = prepared
  sd, vision = components
  sd = dataclasses.replace(sd, vae_params=_scaled(sd.vae_params, "['quant_conv']", 2.0))
  fresh = precompute.get_feature_source(config, config.data.tfds_data_dir, sd, vision)
  assert fresh.path != features.path and fresh.path.parent == features.path.parent
  old, new = _features(features, [0]), _features(fresh, [0])
  assert np.abs(new['latent_mean'].astype(np.float32)
                - old['latent_mean'].astype(np.float32)).max() > 1e-3
  np.testing.assert_array_equal(new['text'], old['text'])  # the text encoder is unchanged


def test_features_that_overflow_float16_are_a_one_line_error(prepared, components):
  config, _, _ = prepared
  sd, vision = components
  sd = dataclasses.replace(sd, vae_params=_scaled(sd.vae_params, "['quant_conv']", 1e6))
  with pytest.raises(ValueError, match=r"not finite in float16; store them as "
                     r"config.data.feature_dtype='float32'") as e:
    precompute.get_feature_source(config, config.data.tfds_data_dir, sd, vision)
  assert '\n' not in str(e.value)
  # Nothing half-written is left for a later run to find.
  key = precompute.cache_key(config, sd, vision)
  features_root = precompute.features_dir(prepared[2].data_dir, key).parent
  assert not [p for p in os.listdir(features_root) if '.tmp' in p]


def test_bad_feature_dtype_is_a_config_error(prepared):
  config = prepared[0].copy_and_resolve_references()
  config.data.feature_dtype = 'int8'
  with pytest.raises(train.ConfigError, match=r"config.data.feature_dtype must be one of "
                     r"\('float16', 'bfloat16', 'float32'\).*got 'int8'") as e:
    train.validate_config(config)
  assert '\n' not in str(e.value)
  config.data.precompute_features = False  # the dtype is not read then
  train.validate_config(config)


def test_iterator_position_carries_over_between_images_and_features(prepared, components):
  config, features, builder = prepared
  images = builder.as_data_source(split='train')
  tokenize = functools.partial(training_inputs.tokenize_caption, components[0].tokenizer)
  decode = precompute.DecodeFeatures(features.layout)
  on_features = iter(input_pipeline.create_train_loader(config, features, None,
                                                        preprocess=decode))
  for _ in range(3):
    batch = next(on_features)
  chex.assert_shape(batch['text'], (BATCH, 77, 32))
  on_images = iter(input_pipeline.create_train_loader(config, images, tokenize))
  on_images.set_state(on_features.get_state())  # grain checks the sampler and source
  straight = iter(input_pipeline.create_train_loader(config, images, tokenize))
  for _ in range(3):
    next(straight)
  chex.assert_trees_all_equal(next(on_images), next(straight))


def _metrics(workdir):
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def test_training_on_features_logs_and_checkpoints(prepared, tmp_path):
  # Restoring the iterator goes through grain's `set_state`, tested above across sources.
  config = prepared[0].copy_and_resolve_references()
  config.train.num_steps, config.train.checkpoint_every = 2, 1
  state = train.train_and_evaluate(config, str(tmp_path))
  metrics = _metrics(tmp_path)
  assert int(state['step']) == 2 and [m['step'] for m in metrics] == [1, 2]
  assert all(np.isfinite(m['loss']) and m['loss'] > 0 for m in metrics)
  assert metrics[0]['loss'] != metrics[1]['loss']  # two batches, two draws
  assert sorted(int(d) for d in os.listdir(tmp_path / train.CHECKPOINT_DIR)
                if d.isdigit()) == [1, 2]


def test_precomputed_features_refuse_a_stored_reference():
  config = tiny_config.get_config()
  config.data.precompute_features = True
  precompute.check_config(config)  # the paper's reference: fine
  config.data.subject_reference = 'stored'
  with pytest.raises(ValueError, match='subject_reference'):
    precompute.check_config(config)
