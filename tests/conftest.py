"""Test setup: 8 fake CPU devices (sharding tests) and a persistent compile cache.

Both must be set before JAX initialises its backend, hence at import of conftest.
"""
import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
from realcustom_jax import cli  # noqa: E402  (absl and etils only: JAX stays unstarted)

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', cli.default_compile_cache_dir())
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import diffusers  # noqa: E402
import transformers  # noqa: E402

diffusers.utils.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()
