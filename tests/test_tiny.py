"""The embedded tiny models: built in code, with no compile, the same on every call."""
import jax
import numpy as np

from configs import tiny as tiny_config
from realcustom_jax.loading import tiny


def test_tiny_components_compile_nothing_and_repeat_exactly():
  compiles = []

  def listen(name, _secs, **_):
    if name == '/jax/core/compile/backend_compile_duration':
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    sd, vision = tiny.build_tiny_components(tiny_config.get_config())
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  # A jitted init costs seconds per model on 2 cores. What may compile: transformers'
  # own PRNGKey(seed) in the CLIP models' constructors (two scalar programs).
  assert len(compiles) <= 2, compiles
  again, _ = tiny.build_tiny_components(tiny_config.get_config())
  same = jax.tree.map(np.array_equal, sd.unet_params, again.unet_params)
  assert all(jax.tree.leaves(same))
  # A sane init scale, not zeros or unit-variance kernels everywhere.
  kernel = np.asarray(sd.unet_params['conv_in']['kernel'])
  fan_in = np.prod(kernel.shape[:-1])
  assert 0.5 < kernel.std() * np.sqrt(fan_in) < 2.0
  assert np.all(np.asarray(sd.vae_params['encoder']['conv_norm_out']['scale']) == 1.0)
  assert vision.params is not None and sd.text_params is not None


def test_host_random_params_follow_the_tree_and_the_seed():
  shapes = {'dense': {'kernel': jax.ShapeDtypeStruct((64, 8), np.float32),
                      'bias': jax.ShapeDtypeStruct((8,), np.float32)},
            'norm': {'scale': jax.ShapeDtypeStruct((8,), np.float32)}}
  a, b = tiny.host_random_params(shapes, 0), tiny.host_random_params(shapes, 1)
  assert jax.tree.structure(a) == jax.tree.structure(shapes)
  assert np.asarray(a['dense']['kernel']).std() == np.float32(
      np.asarray(tiny.host_random_params(shapes, 0)['dense']['kernel']).std())
  assert not np.array_equal(a['dense']['kernel'], b['dense']['kernel'])
  assert np.all(np.asarray(a['dense']['bias']) == 0) and np.all(np.asarray(a['norm']['scale']) == 1)
