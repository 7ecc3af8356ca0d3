"""Sampling cost of RealCustom against plain classifier-free guidance on the same UNet.

Times only the jitted DDIM scan (UNet + scoring + influence scope), no VAE or
encoders, so `ratio_vs_cfg` isolates the sampler: RealCustom makes three UNet passes
per step against CFG's two, so 1.5 is the floor. Weights are random (nothing is read).

Where a ratio above 1.5 comes from, in two figures beside it:
  - `flops_ratio_vs_cfg`: model FLOPs per step of the two loops (XLA's cost analysis of
    their CPU lowering, XLA attention): the compute RealCustom's extras add.
  - with --unet_passes, `three_pass_floor` = 1 + t(B) / t(2B), the timed plain UNet
    passes at batch B and 2B: what the ratio would be if the extras cost nothing. The
    B-row TI2I call cannot join the 2B-row [uncond, T2I] call (its scope needs that
    call's maps), so a small batch that under-fills the device raises this floor.
--profile_dir traces one call of each loop after the timing (realcustom/, cfg/) for
`benchmarks.trace_summary`.

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
from realcustom_jax import kernels
from realcustom_jax import sampler
from realcustom_jax import schedules
from realcustom_jax.loading import tiny  # DDIM scheduler config of SD 1.5
from realcustom_jax import adapter_training as training

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/tiny.py).')
_ARCH = flags.DEFINE_enum('arch', 'tiny', ['tiny', 'sd15'],
                          'tiny: config.tiny.unet; sd15: an SD 1.5-size UNet at 512 px.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Images per sampler call.')
_STEPS = flags.DEFINE_integer('steps', None, 'DDIM steps (default config.sampler.num_steps).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                           'UNet compute and weight dtype (default config.model.dtype).')
_ATTENTION = flags.DEFINE_enum('attention_impl', None, list(kernels.ATTENTION_IMPLS),
                               'Attention kernels (default from the config).')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed runs per sampler (median reported).')
_COMPILE_STEPS = flags.DEFINE_list('compile_steps', ['10', '50'],
                                   'Step counts whose compile time is reported.')
_UNET_PASSES = flags.DEFINE_bool('unet_passes', False, 'Also time one plain UNet pass at '
                                 'batch B and 2B (two more compiles): three_pass_floor.')
_FUSED_WORD_MAPS = flags.DEFINE_bool(
    'fused_word_maps', True, 'T2I word maps out of the fused text kernel; --no: their '
    "probabilities through XLA beside it (config.model.fused_word_maps=False), for a "
    'ratio of the two in one run.')
_PROFILE_DIR = flags.DEFINE_string('profile_dir', None, 'After timing, trace one call of '
                                   'each loop into DIR/realcustom and DIR/cfg.')

def _setup_model(config, arch_name: str, dtype: str, attention_impl: str,
                 fused_word_maps: bool = True):
  return common.build_model(config, common.arch(config, arch_name), dtype=dtype,
                            attention_impl=attention_impl, fused_word_maps=fused_word_maps)


def _setup(config, arch_name: str, dtype: str, attention_impl: str, fused_word_maps: bool):
  """The model, random params and the shapes of its inputs."""
  a = common.arch(config, arch_name)
  model = _setup_model(config, arch_name, dtype, attention_impl, fused_word_maps)
  params = common.random_params(model, a, seed=0)
  if dtype != 'float32':
    # Inference in half precision: the frozen UNet's weights too (the adapter stays f32).
    params = dict(params, unet=training.cast_floating(params['unet'], dtype))
  return model, params, a.latent, a.text[0], a.image[0], a.image[1]


def _inputs(model, batch, latent, text_len, n_i, c_i):
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  c_t = model.unet.cross_attention_dim
  word_weights = jnp.zeros((batch, text_len)).at[:, 2].set(1.0)
  conditions = sampler.Conditions(
      text=jax.random.normal(k[1], (batch, text_len, c_t)),
      uncond_text=jax.random.normal(k[2], (batch, text_len, c_t)),
      image=jax.random.normal(k[3], (batch, n_i, c_i)), word_weights=word_weights)
  return dict(latents=jax.random.normal(k[0], (batch,) + latent), conditions=conditions)


def _rc_args(params, schedule, x, settings):
  return (params, schedule, x['latents'], x['conditions'], settings)


def _cfg_args(params, schedule, x, settings):
  text_only = x['conditions'].replace(image=None, word_weights=None)
  return (params, schedule, x['latents'], text_only, settings)


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


def _flops_per_step(config, arch: str, dtype: str, params, x, settings) -> tuple[float, float]:
  """(RealCustom, CFG) model FLOPs of one loop step, from one-step loops lowered for the
  CPU with XLA attention (see `common.cpu_lowering_flops`)."""
  model = _setup_model(config, arch, dtype, 'xla')
  one_step = schedules.ddim_schedule(tiny.SCHEDULER_CONFIG, 1)
  return (common.cpu_lowering_flops(sampler.build_sampler(model),
                                    *_rc_args(params, one_step, x, settings)),
          common.cpu_lowering_flops(sampler.build_cfg_sampler(model),
                                    *_cfg_args(params, one_step, x, settings)))


def _unet_pass_seconds(model, params, x, repeats: int) -> tuple[float, float]:
  """Median seconds of one plain UNet pass (text only) at batch B and at 2B."""
  def inputs(rows):
    reps = rows // x['latents'].shape[0]
    tile = lambda a: jnp.concatenate([a] * reps, axis=0)
    return (params, tile(x['latents']), jnp.full((rows,), 500), tile(x['conditions'].text))

  unet_pass = lambda p, z, t, c: model.apply({'params': p}, z, t, c)
  batch = x['latents'].shape[0]
  runs = []
  for rows in (batch, 2 * batch):
    args = inputs(rows)
    runs.append((jax.jit(unet_pass).lower(*args).compile(), args))
  return tuple(_time_interleaved(runs, repeats))


def _profile(profile_dir: str, runs: dict) -> None:
  for name, (compiled, args) in runs.items():
    with jax.profiler.trace(f'{profile_dir}/{name}', create_perfetto_trace=True):
      jax.block_until_ready(compiled(*args))


def benchmark(config, arch: str = 'tiny', batch: int = 1, steps=None, dtype=None,
              attention_impl=None, repeats: int = 5, compile_steps=(10, 50),
              unet_passes: bool = False, profile_dir=None, fused_word_maps: bool = True) -> dict:
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
  model, params, latent, text_len, n_i, c_i = _setup(config, arch, dtype, attention_impl,
                                                     fused_word_maps)
  x = _inputs(model, batch, latent, text_len, n_i, c_i)
  s = sampler.GuidanceSettings.from_config(config.sampler)
  scheduler_config = tiny.SCHEDULER_CONFIG
  rc_fn = sampler.build_sampler(model)
  cfg_fn = sampler.build_cfg_sampler(model)

  compile_s, compiled = {}, {}
  for n in sorted(set(compile_steps) | {steps}):
    logging.info('compiling RealCustom for %d steps', n)
    compiled[n], compile_s[n], fused_calls = _compile(
        rc_fn, _rc_args(params, schedules.ddim_schedule(scheduler_config, n), x, s))
  rc = compiled[steps]
  schedule = schedules.ddim_schedule(scheduler_config, steps)
  logging.info('compiling plain CFG for %d steps', steps)
  cfg, cfg_compile, _ = _compile(cfg_fn, _cfg_args(params, schedule, x, s))
  logging.info('timing (%d runs each)', repeats)
  runs = {'realcustom': (rc, _rc_args(params, schedule, x, s)),
          'cfg': (cfg, _cfg_args(params, schedule, x, s))}
  rc_s, cfg_s = _time_interleaved(list(runs.values()), repeats)
  if profile_dir:
    _profile(profile_dir, runs)
  rc_flops, cfg_flops = _flops_per_step(config, arch, dtype, params, x, s)
  device = jax.devices()[0]
  result = dict(
      benchmark='sampling', arch=arch, device_kind=device.device_kind,
      platform=device.platform, dtype=dtype, attention_impl=attention_impl, batch=batch,
      steps=steps, repeats=repeats,
      realcustom_s_per_image=rc_s / batch, cfg_s_per_image=cfg_s / batch,
      ratio_vs_cfg=rc_s / cfg_s, fused_attention_calls=fused_calls,
      realcustom_images_per_s=batch / rc_s, cfg_images_per_s=batch / cfg_s,
      fused_word_maps=fused_word_maps,
      compile_s_cfg=cfg_compile, realcustom_flops_per_step=rc_flops,
      cfg_flops_per_step=cfg_flops, flops_ratio_vs_cfg=rc_flops / cfg_flops)
  if unet_passes:
    logging.info('timing plain UNet passes at batch %d and %d', batch, 2 * batch)
    one, two = _unet_pass_seconds(model, params, x, repeats)
    result.update(unet_pass_ms_b=1e3 * one, unet_pass_ms_2b=1e3 * two,
                  three_pass_floor=1 + one / two)
  for n in compile_steps:
    result[f'compile_s_{n}_steps'] = compile_s[n]
  return {k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}


def _from_flags() -> dict:
  if _CONFIG.value is None:
    raise ValueError('--config is required (e.g. --config=configs/tiny.py)')
  compile_steps = tuple(int(n) for n in _COMPILE_STEPS.value)
  return benchmark(_CONFIG.value, _ARCH.value, _BATCH.value, _STEPS.value, _DTYPE.value,
                   _ATTENTION.value, _REPEATS.value, compile_steps, _UNET_PASSES.value,
                   _PROFILE_DIR.value, _FUSED_WORD_MAPS.value)


def main(argv) -> None:
  common.report(argv, _from_flags)


if __name__ == '__main__':
  app.run(main)
