"""Sampling cost of RealCustom against plain classifier-free guidance on the same UNet.

Times only the jitted DDIM scan (UNet + scoring + influence scope), no VAE or
encoders, so `ratio_vs_cfg` isolates the sampler: RealCustom makes three UNet passes
per step against CFG's two, so 1.5 is the floor. Weights are random (nothing is read).

  python -m benchmarks.sampling --config=configs/tiny.py                  # CPU, tiny
  python -m benchmarks.sampling --config=configs/tiny.py --arch=sd15 \\
      --dtype=bfloat16 --steps=50 --batch=1                               # accelerator

The last line printed is one JSON object.
"""
import statistics
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags

from benchmarks import common
from realcustom_jax import attention
from realcustom_jax import sampler
from realcustom_jax import tiny  # DDIM scheduler config of SD 1.5
from realcustom_jax import training

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/tiny.py).')
_ARCH = flags.DEFINE_enum('arch', 'tiny', ['tiny', 'sd15'],
                          'tiny: config.tiny.unet; sd15: an SD 1.5-size UNet at 512 px.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Images per sampler call.')
_STEPS = flags.DEFINE_integer('steps', None, 'DDIM steps (default config.sampler.num_steps).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'UNet compute and weight dtype (default config.model.dtype).')
_ATTENTION = flags.DEFINE_enum('attention_impl', None, list(attention.ATTENTION_IMPLS),
                               'Attention kernels (default from the config).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per sampler (median reported).')
_COMPILE_STEPS = flags.DEFINE_list('compile_steps', ['10', '50'],
                                   'Step counts whose compile time is reported.')

def _setup(config, arch_name: str, dtype: str, attention_impl: str):
  """The model, random params and the shapes of its inputs."""
  a = common.arch(config, arch_name)
  model = common.build_model(config, a, dtype=dtype, attention_impl=attention_impl)
  params = common.random_params(model, a, seed=0)
  if dtype != 'float32':
    # Inference in half precision: the frozen UNet's weights too (the adapter stays f32).
    params = dict(params, unet=training.cast_floating(params['unet'], dtype))
  return model, params, a.latent, a.text[0], a.image[0], a.image[1]


def _inputs(model, batch, latent, text_len, n_i, c_i):
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  c_t = model.unet.cross_attention_dim
  word_weights = jnp.zeros((batch, text_len)).at[:, 2].set(1.0)
  return dict(latents=jax.random.normal(k[0], (batch,) + latent),
              text=jax.random.normal(k[1], (batch, text_len, c_t)),
              uncond=jax.random.normal(k[2], (batch, text_len, c_t)),
              image=jax.random.normal(k[3], (batch, n_i, c_i)),
              word_weights=word_weights)


def _rc_args(params, schedule, x, settings):
  return (params, schedule, x['latents'], x['text'], x['uncond'], x['image'],
          x['word_weights'], settings)


def _cfg_args(params, schedule, x, settings):
  return (params, schedule, x['latents'], x['text'], x['uncond'], settings)


def _compile(fn, args) -> tuple:
  """(compiled, seconds, fused attention calls in the lowered program)."""
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  return compiled, time.perf_counter() - start, common.fused_attention_calls(lowered)


def _time_interleaved(runs, repeats: int) -> list[float]:
  """Median seconds per call of each (compiled, args), alternating the calls so that
  load from other processes hits both alike."""
  for compiled, args in runs:
    jax.block_until_ready(compiled(*args))  # warm-up (allocations, first transfers)
  times = [[] for _ in runs]
  for _ in range(repeats):
    for (compiled, args), out in zip(runs, times):
      start = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def benchmark(config, arch: str = 'tiny', batch: int = 1, steps=None, dtype=None,
              attention_impl=None, repeats: int = 5, compile_steps=(10, 50)) -> dict:
  """Runs the benchmark and returns the result dict (see the module docstring).

  Compile times include persistent-cache hits unless the cache is off (`main` turns it
  off; a library caller decides for itself).

  Raises:
    ValueError: for a non-positive batch, step or repeat count.
  """
  steps = config.sampler.num_steps if steps is None else steps
  dtype = dtype or config.model.dtype
  attention_impl = attention_impl or config.model.attention_impl
  for name, value in (('batch', batch), ('steps', steps), ('repeats', repeats)):
    if value < 1:
      raise ValueError(f'--{name} must be positive, got {value}')
  model, params, latent, text_len, n_i, c_i = _setup(config, arch, dtype, attention_impl)
  x = _inputs(model, batch, latent, text_len, n_i, c_i)
  s = sampler.GuidanceSettings.from_config(config.sampler)
  scheduler_config = tiny.SCHEDULER_CONFIG
  rc_fn = sampler.build_sampler(model)
  cfg_fn = sampler.build_cfg_sampler(model)

  compile_s, compiled = {}, {}
  for n in sorted(set(compile_steps) | {steps}):
    logging.info('compiling RealCustom for %d steps', n)
    compiled[n], compile_s[n], fused_calls = _compile(
        rc_fn, _rc_args(params, sampler.ddim_schedule(scheduler_config, n), x, s))
  rc = compiled[steps]
  schedule = sampler.ddim_schedule(scheduler_config, steps)
  logging.info('compiling plain CFG for %d steps', steps)
  cfg, cfg_compile, _ = _compile(cfg_fn, _cfg_args(params, schedule, x, s))
  logging.info('timing (%d runs each)', repeats)
  rc_s, cfg_s = _time_interleaved(
      [(rc, _rc_args(params, schedule, x, s)), (cfg, _cfg_args(params, schedule, x, s))],
      repeats)
  device = jax.devices()[0]
  result = dict(
      benchmark='sampling', arch=arch, device_kind=device.device_kind,
      platform=device.platform, dtype=dtype, attention_impl=attention_impl, batch=batch,
      steps=steps, repeats=repeats,
      realcustom_s_per_image=rc_s / batch, cfg_s_per_image=cfg_s / batch,
      ratio_vs_cfg=rc_s / cfg_s, fused_attention_calls=fused_calls,
      realcustom_images_per_s=batch / rc_s, cfg_images_per_s=batch / cfg_s,
      compile_s_cfg=cfg_compile)
  for n in compile_steps:
    result[f'compile_s_{n}_steps'] = compile_s[n]
  return {k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}


def _from_flags() -> dict:
  if _CONFIG.value is None:
    raise ValueError('--config is required (e.g. --config=configs/tiny.py)')
  compile_steps = tuple(int(n) for n in _COMPILE_STEPS.value)
  return benchmark(_CONFIG.value, _ARCH.value, _BATCH.value, _STEPS.value, _DTYPE.value,
                   _ATTENTION.value, _REPEATS.value, compile_steps)


def main(argv) -> None:
  common.report(argv, _from_flags)


if __name__ == '__main__':
  app.run(main)
