"""Test setup: 8 fake CPU devices (sharding tests) and a persistent compile cache (both
set before JAX initialises its backend, hence at import of conftest), and the fixtures
several test files share: the tiny models in memory and on disk, kernel call spies.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
from realcustom_jax.runtime import cli  # noqa: E402  (absl and etils only: JAX stays unstarted)

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', cli.default_compile_cache_dir())
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import diffusers  # noqa: E402
import transformers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()


import pytest  # noqa: E402


@pytest.fixture
def cudnn_on_cpu(monkeypatch):
  """Runs `jax.nn.dot_product_attention` calls made for cuDNN (or any kernel) through
  JAX's own XLA kernel, as a CPU can, and records each call: a list of
  (implementation, q, k, v, keyword arguments)."""
  import jax  # pylint: disable=g-import-not-at-top
  calls = []
  real = jax.nn.dot_product_attention

  def on_cpu(q, k, v, *, implementation=None, **kwargs):
    calls.append((implementation, q, k, v, kwargs))
    return real(q, k, v, implementation='xla', **kwargs)

  monkeypatch.setattr(jax.nn, 'dot_product_attention', on_cpu)
  return calls


@pytest.fixture
def pallas_rows(monkeypatch):
  """Records the batch (leading) size of every Pallas TPU flash-attention call traced:
  how many rows one device's kernel sees."""
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # pylint: disable=g-import-not-at-top
  rows = []
  real = pallas_flash.flash_attention

  def spy(q, *args, **kwargs):
    rows.append(q.shape[0])
    return real(q, *args, **kwargs)

  monkeypatch.setattr(pallas_flash, 'flash_attention', spy)
  return rows


@pytest.fixture(scope='session')
def tiny_components():
  """(StableDiffusionComponents, VisionEncoder): configs/tiny.py's tiny random models,
  built once per test process."""
  from configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import tiny  # pylint: disable=g-import-not-at-top
  return tiny.build_tiny_components(tiny_config.get_config())


@pytest.fixture(scope='session')
def tiny_pretrained(tmp_path_factory):
  """(sd_dir, vision_dir): tiny random torch models of configs/tiny.py's sizes, saved once
  per test process in the real diffusers / transformers layouts (needs torch)."""
  pytest.importorskip('torch')
  from configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top
  from tests import testing  # pylint: disable=g-import-not-at-top
  return testing.save_tiny_pretrained(str(tmp_path_factory.mktemp('tiny_pretrained')),
                                      tiny_config.get_config())


@pytest.fixture(scope='module')
def subject(tmp_path_factory):
  """A 40 x 30 RGBA noise image as a subject file (the CLIs convert and resize it)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('subject') / 'toy.png'
  rng = np.random.RandomState(0)
  Image.fromarray((rng.rand(40, 30, 4) * 255).astype(np.uint8), 'RGBA').save(path)
  return str(path)
