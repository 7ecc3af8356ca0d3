"""Sharded training step on 8 fake CPU devices equals the 1-device step."""
import jax
import numpy as np
import pytest

from configs import tiny as tiny_config
from realcustom_jax import adapter as adapter_lib
from realcustom_jax import kernels
from realcustom_jax.runtime import sharding
from realcustom_jax import adapter_training as training

BATCH = 8


def _config():
  c = tiny_config.get_config()
  # Only the keys the step reads (configs/tiny.py may not carry them yet).
  c.train = dict(learning_rate=1e-4, weight_decay=0.01, gamma_num_range=(0.3, 1.0),
                 image_dropout=0.25, frozen_dtype='float32')
  return c


def _names(path) -> tuple[str, ...]:
  return tuple(k.key for k in path)


@pytest.fixture(scope='module')
def components(tiny_components):
  config = _config()
  sd, vision = tiny_components
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.uniform(-1, 1, (BATCH, config.resolution, config.resolution, 3)
                           ).astype(np.float32),
      'input_ids': rng.integers(0, len(sd.tokenizer), (BATCH, 77)).astype(np.int32),
  }
  return config, sd, vision, batch


def _run_step(config, sd, vision, batch, mesh):
  setup, _ = training.setup_training(config, mesh, sd, vision)
  frozen_before = jax.device_get(setup.frozen)
  gbatch = sharding.shard_batch(batch, mesh)
  frozen = setup.frozen
  new_state, metrics = setup.train_step(batch)(setup.state, frozen, gbatch)
  return jax.device_get(new_state), frozen_before, jax.device_get(frozen), new_state, metrics


@pytest.mark.parametrize('data,fsdp', [(4, 2)])
def test_sharded_step_matches_single_device(components, data, fsdp):
  config, sd, vision, batch = components
  mesh1 = sharding.create_mesh({'data': 1, 'fsdp': 1}, devices=jax.devices()[:1])
  mesh8 = sharding.create_mesh({'data': data, 'fsdp': fsdp})
  assert dict(mesh8.shape) == {'data': data, 'fsdp': fsdp}
  one, _, _, _, m1 = _run_step(config, sd, vision, batch, mesh1)
  many, frozen_before, frozen_after, live, m8 = _run_step(config, sd, vision, batch, mesh8)

  np.testing.assert_allclose(float(m1['loss']), float(m8['loss']), rtol=1e-5)
  assert int(many['step']) == 1
  close = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one['params'], many['params'])
  assert max(jax.tree.leaves(close)) <= 1e-5, close
  # The step really moved the adapter.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one['params'],
                       jax.device_get(training.init_adapter(
                           training.build_models(config, sd, vision)[0].model, sd.unet_params,
                           jax.random.split(jax.random.PRNGKey(config.seed))[0],
                           training.feature_shapes(sd, vision, config.resolution))))
  assert max(jax.tree.leaves(moved)) > 0
  # Frozen weights are bitwise untouched.
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, frozen_before, frozen_after)))
  # With fsdp=2, some adapter leaves really are split over the 'fsdp' axis.
  specs = [x.sharding.spec for x in jax.tree.leaves(live['params'])]
  assert any(sharding.FSDP_AXIS in tuple(s) for s in specs)


def test_both_steps_trace_under_their_mesh(components, monkeypatch):
  # What lets a Pallas kernel run per device (`kernels.per_batch_shard`): the steps
  # are traced under the setup's mesh.
  config, sd, vision, batch = components
  mesh = sharding.create_mesh({'data': 4, 'fsdp': 2})
  setup, _ = training.setup_training(config, mesh, sd, vision)
  seen = []

  def spy(state, *args, **kwargs):
    seen.append(kernels.current_batch_mesh())
    return state, {'loss': jax.numpy.zeros(())}

  monkeypatch.setattr(training, 'train_step', spy)
  monkeypatch.setattr(training, 'adapter_step', spy)
  lowered = setup.train_step(batch).lower(setup.state, setup.frozen,
                                          sharding.shard_batch(batch, mesh))
  b, size = BATCH, config.tiny.unet['sample_size']
  setup.adapter_step().lower(setup.state, setup.frozen['unet'],
                             np.zeros((b, 4, size, size), np.float32),
                             np.zeros((b, 77, 32), np.float32),
                             np.zeros((b, 4, 32), np.float32))
  assert [dict(m.shape) for m in seen] == [{'data': 4, 'fsdp': 2}] * 2
  # The XLA module keeps the step function's name (here the spy's), not the wrapper's.
  assert 'module @jit_spy' in lowered.as_text()
  assert kernels.current_batch_mesh() is None  # and nothing leaks out


@pytest.mark.slow  # `make test-slow` (Makefile: the suite's time budget): about 90 s
def test_pallas_attention_in_a_sharded_step_matches_one_device(components, pallas_rows):
  # The TPU kernel (Pallas interpret mode on CPU devices) in every layer of a step
  # sharded 2 x 2: each device runs it on its own row, and the step equals the
  # one-device step with XLA attention.
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  config, sd, vision, batch = components
  batch = {k: v[:4] for k, v in batch.items()}
  mesh1 = sharding.create_mesh({'data': 1, 'fsdp': 1}, devices=jax.devices()[:1])
  one, _, _, _, m1 = _run_step(config, sd, vision, batch, mesh1)
  config = config.copy_and_resolve_references()
  config.model.attention_impl = 'pallas'
  mesh4 = sharding.create_mesh({'data': 2, 'fsdp': 2}, devices=jax.devices()[:4])
  with pltpu.force_tpu_interpret_mode():
    many, _, _, _, m4 = _run_step(config, sd, vision, batch, mesh4)
  assert pallas_rows and set(pallas_rows) == {1}
  np.testing.assert_allclose(float(m1['loss']), float(m4['loss']), rtol=1e-5)
  # AdamW's first step moves each entry by about lr = 1e-4 times g / |g|: where g is
  # near zero the two kernels' rounding shows, so a third of a step is the bound.
  close = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), one['params'], many['params'])
  assert max(jax.tree.leaves(close)) <= 3e-5, close


def test_optimizer_state_holds_only_adapter_leaves(components):
  config, sd, vision, _ = components
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1})
  setup, _ = training.setup_training(config, mesh, sd, vision)
  state, frozen = setup.state, setup.frozen
  params = state['params']
  n_adapter = adapter_lib.count_params(params)
  assert n_adapter > 0
  # AdamW: mu and nu mirror the adapter tree; everything else is scalar counters.
  opt_leaves = jax.tree.leaves(state['opt_state'])
  assert adapter_lib.count_params(state['opt_state']) == 2 * n_adapter + sum(
      1 for x in opt_leaves if x.ndim == 0)
  adam = [s for s in jax.tree.leaves(state['opt_state'], is_leaf=lambda x: hasattr(x, 'mu'))
          if hasattr(s, 'mu')]
  assert len(adam) == 1
  assert jax.tree.structure(adam[0].mu) == jax.tree.structure(params)
  paths = [_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert paths and all(adapter_lib.is_adapter_path(p) for p in paths)
  frozen_paths = [_names(p)[1:] for p, _ in
                  jax.tree_util.tree_leaves_with_path(frozen['unet'])]
  assert not any(adapter_lib.is_adapter_path(('unet',) + p) for p in frozen_paths)


@pytest.mark.parametrize('batch,ok', [(8, True), (16, True), (6, False), (4, False)])
def test_batch_must_divide_data_parallel_size(batch, ok):
  mesh = sharding.create_mesh({'data': 4, 'fsdp': 2})
  local = {'image': np.zeros((batch, 4, 4, 3), np.float32)}
  if ok:
    out = sharding.shard_batch(local, mesh)
    assert out['image'].shape == (batch, 4, 4, 3)
    assert out['image'].sharding.spec[0] == sharding.BATCH_AXES
  else:
    with pytest.raises(ValueError, match='data-parallel size 8'):
      sharding.shard_batch(local, mesh)


@pytest.mark.parametrize('data,fsdp,expect', [
    (-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, -1, (2, 4)), (8, 1, (8, 1))])
def test_mesh_shape_infers_one_axis(data, fsdp, expect):
  assert sharding.mesh_shape({'data': data, 'fsdp': fsdp}, 8) == expect


@pytest.mark.parametrize('data,fsdp', [(-1, -1), (3, -1), (4, 4), (0, 8)])
def test_bad_mesh_raises(data, fsdp):
  with pytest.raises(ValueError):
    sharding.mesh_shape({'data': data, 'fsdp': fsdp}, 8)


def test_param_spec_shards_largest_divisible_dim():
  assert sharding.param_spec((3, 8, 4), 2) == sharding.P(None, sharding.FSDP_AXIS, None)
  assert sharding.param_spec((3, 5), 2) == sharding.P()
  assert sharding.param_spec((), 2) == sharding.P()
  assert sharding.param_spec((8, 4), 1) == sharding.P()
