"""Times the adapter train step and reports XLA-counted FLOP/s and MFU.

  python -m benchmarks.train_step --config=configs/tiny.py
  python -m benchmarks.train_step --config=configs/tiny.py --arch=sd15 --dtype=bfloat16 \
      --batch=8 --peak_tflops=989 [--remat=dots] [--attention_impl=auto] [--profile_dir=DIR]

The step is `training.adapter_step`: noising (Eq. 2), the frozen UNet forward with the
visual branch, the backward pass to the adapter and one AdamW update, on pre-computed
latents / text / image features with RANDOM weights (`common.random_params`, no
files). The frozen encoders (VAE, CLIP text / vision) are excluded ("encoders":
"excluded" in the JSON). The frozen UNet is held and computed in `--dtype`; adapter
params and optimizer state stay float32. FLOPs are the model's: XLA's cost analysis of
the same step lowered with XLA attention and no remat (before XLA's passes, which hand
convolutions and matmuls to library calls it does not count; a fused attention kernel
is a custom call it does not count either, and remat's recomputation is not model
work). MFU is achieved FLOP/s over `--peak_tflops` (e.g. 989 for H100 SXM bf16 dense;
0 = no MFU).

The release's architecture (SDXL + the release's projector and visual K/V,
`realcustom_jax.release.training`) is estimated, not timed: `--arch=sdxl_release` (the
full SDXL UNet at 1024 px, the projector over SigLIP + DINOv2 features of a 768 px
reference) or `--arch=release_tiny` (the tiny SDXL). The step (`adapter_step` with
SDXL's added conditioning, encoders excluded as above, i.e. training on precomputed
features) is lowered and compiled for the CPU from `jax.ShapeDtypeStruct`s only (no
weights are allocated), and the JSON gives its model FLOPs and XLA's memory analysis of
the compiled program: arguments (frozen UNet, adapter, optimizer state, batch), temps,
and their sum less the donated state as `estimated_peak_bytes`, per device on one
device. XLA:CPU attention materialises every attention matrix, so on GPUs with fused
attention the temps are an upper bound.

  python -m benchmarks.train_step --arch=sdxl_release --batch=4 --remat=dots

The LAST line printed is the JSON result.
"""
import functools
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from benchmarks import common
from realcustom_jax import adapter as adapter_lib
from realcustom_jax import kernels
from realcustom_jax.loading import tiny
from realcustom_jax.release import tiny_sdxl
from realcustom_jax.runtime import sharding
from realcustom_jax import adapter_training as training
from realcustom_jax import unet as unet_lib
from realcustom_jax import model as model_lib
from realcustom_jax.release import convert as release_convert
from realcustom_jax.release import model as release_model

FLAGS = flags.FLAGS
# The release's architecture: (UNet config, latent side, global / local tokens, vision
# width, projector head width, pooled width). SDXL at 1024 px; SigLIP so400m + DINOv2-L
# at 384 px views of a 768 px reference: 729 global and 4 x 729 local tokens, 2176 wide.
RELEASE_ARCHS = {
    'sdxl_release': (release_convert.RELEASE_UNET_CONFIG, 128, 729, 2916, 2176, 64, 1280),
    'release_tiny': (tiny_sdxl.SDXL_UNET, 16, 4, 16, 64, 16, 20),
}
config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.')
flags.DEFINE_enum('arch', 'tiny', ['tiny', 'sd15', *RELEASE_ARCHS],
                  'UNet size: the config\'s tiny UNet or Stable Diffusion 1.5 (64x64 '
                  'latents, 77x768 text, 256x1024 image); the release architecture at '
                  'full SDXL size or tiny (estimated only: FLOPs and memory).')
flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                  'Frozen UNet dtype; default config.model.dtype.')
flags.DEFINE_integer('batch', None, 'Batch size; default 2 (tiny) / 8 (sd15).')
flags.DEFINE_integer('steps', 10, 'Timed steps.')
flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of the device for MFU; 0: none.')
flags.DEFINE_enum('remat', 'none', ['none', *unet_lib.REMAT_POLICIES],
                  'Transformer-block remat policy (see unet.REMAT_POLICIES).')
flags.DEFINE_enum('attention_impl', None, list(kernels.ATTENTION_IMPLS),
                  'Attention kernels; default config.model.attention_impl.')
flags.DEFINE_string('profile_dir', None, 'After timing, trace a few more steps with the JAX '
                    'profiler into this directory (TensorBoard / Perfetto; summarise it '
                    'with benchmarks.trace_summary).')
_PROFILE_STEPS = 3


def model_flops(models: training.Models, setup: training.TrainSetup, *batch) -> float:
  """The step's model FLOPs: XLA's cost analysis of the step as lowered for the CPU
  (`common.cpu_lowering_flops`), with `models` built with XLA attention and no remat.

  As lowered, before XLA's passes: after them, XLA:GPU leaves out the work it hands to
  cuBLAS / cuDNN custom calls (on an H200 it counted 1.8 of 13.6 TFLOP at SD 1.5 batch
  8, and did not double with the batch), and JAX 0.11 on a GPU gives no cost analysis
  of a lowered program at all. A fused attention kernel is such a call already in the
  lowered program, and remat's recomputation is not model work. The CPU lowering of the
  same step (a lowering, not a compile: seconds) counts what the model computes on any
  backend.
  """
  step = functools.partial(training.adapter_step, models=models,
                           step_config=setup.step_config, optimizer=setup.optimizer)
  return common.cpu_lowering_flops(step, setup.state, setup.frozen['unet'], *batch,
                                   jax.random.PRNGKey(0))


def run(config, arch: str, dtype_name: str, batch: int, steps: int, warmup: int,
        peak_tflops: float, remat: str, attention_impl: str,
        profile_dir: str | None = None) -> dict:
  """Builds, compiles and times the step; returns the result dict.

  Raises:
    ValueError: for a non-positive batch or step count, or a negative warm-up or peak.
  """
  for name, value, least in (('batch', batch, 1), ('steps', steps, 1),
                             ('warmup', warmup, 0), ('peak_tflops', peak_tflops, 0)):
    if value < least:
      raise ValueError(f'--{name} must be >= {least}, got {value}')
  a = common.arch(config, arch)
  (_, side, _), (n_t, c_t), (n_i, c_i) = a.latent, a.text, a.image
  config = config.copy_and_resolve_references()
  config.train.frozen_dtype = dtype_name
  step_config = training.build_step_config(config, tiny.SCHEDULER_CONFIG)

  def models_with(**model_overrides) -> training.Models:
    model = common.build_model(config, a, dtype=dtype_name, **model_overrides)
    return training.Models(model=model, vae=None, text_encoder=None, vision_model=None,
                           scaling_factor=1.0, vision_resize=0, vision_size=0,
                           vision_mean=(0.0,) * 3, vision_std=(1.0,) * 3)

  # ---- Random weights drawn on the host (no model.init compile) ----
  params = adapter_lib.init_visual_kv_from_text(
      common.random_params(common.build_model(config, a, dtype=dtype_name), a, seed=0))
  base, adapter = adapter_lib.split_params(params)
  # The train loop's own set-up (optimizer, state, placement) on one device.
  setup = training.place_train_setup(
      config, sharding.create_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1]),
      models_with(remat=remat, attention_impl=attention_impl), step_config, adapter,
      {'unet': base['unet']})
  state, unet_params = setup.state, setup.frozen['unet']

  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  latents = jax.random.normal(keys[0], (batch, 4, side, side))
  text = jax.random.normal(keys[1], (batch, n_t, c_t))
  image = jax.random.normal(keys[2], (batch, n_i, c_i))

  logging.info('compiling the train step (%s, batch %d)', arch, batch)
  t0 = time.perf_counter()
  lowered = setup.adapter_step().lower(state, unet_params, latents, text, image)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  logging.info('compiled in %.1f s; timing %d steps', compile_s, steps)
  program_flops, compiled_flops = common.flops(lowered), common.flops(compiled)
  flops = model_flops(models_with(remat='none', attention_impl='xla'), setup, latents, text,
                      image)

  for _ in range(warmup):
    state, metrics = compiled(state, unet_params, latents, text, image)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, unet_params, latents, text, image)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  if profile_dir:  # a few more steps under the profiler, after (not in) the timing
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(_PROFILE_STEPS):
        state, metrics = compiled(state, unet_params, latents, text, image)
      jax.block_until_ready((state, metrics))

  steps_per_sec = steps / elapsed
  tflops = flops * steps_per_sec / 1e12
  return {
      'benchmark': 'train_step', 'arch': arch, 'device_kind': jax.devices()[0].device_kind,
      'platform': jax.devices()[0].platform, 'num_devices': 1, 'batch': batch,
      'dtype': dtype_name, 'remat': remat, 'attention_impl': attention_impl,
      'fused_attention_calls': common.fused_attention_calls(lowered),
      'encoders': 'excluded', 'steps_per_sec': round(steps_per_sec, 4),
      'samples_per_sec': round(steps_per_sec * batch, 3),
      'step_ms': round(1000 * elapsed / steps, 3), 'compile_s': round(compile_s, 2),
      'flops_per_step': flops, 'program_flops_per_step': program_flops,
      'compiled_flops_per_step': compiled_flops,
      'tflops_per_sec': round(tflops, 4),
      'peak_tflops': peak_tflops or None,
      'mfu': round(tflops / peak_tflops, 4) if peak_tflops else None,
      'adapter_params': adapter_lib.count_params(adapter),
      'frozen_unet_params': adapter_lib.count_params(unet_params),
      'loss': float(metrics['loss']), 'profile_dir': profile_dir,
  }


def release_estimate(arch: str, dtype_name: str, batch: int, remat: str) -> dict:
  """FLOPs and XLA's memory analysis of the release's adapter step, from shapes only.

  Raises:
    ValueError: a non-positive batch.
  """
  if batch < 1:
    raise ValueError(f'--batch must be >= 1, got {batch}')
  unet_config, side, n_g, n_l, vision_dim, dim_head, pooled = RELEASE_ARCHS[arch]
  config = ml_collections.ConfigDict(dict(
      seed=0, model=dict(projector='release_highres', scoring='none', dtype=dtype_name,
                         remat=remat, attention_impl='xla', release_vision_dim=vision_dim,
                         release_dim_head=dim_head),
      train=dict(learning_rate=1e-5, weight_decay=0.01, warmup_steps=0, grad_clip_norm=1.0,
                 gamma_num_range=(1.0, 1.0), image_dropout=0.0, frozen_dtype=dtype_name)))
  model = release_model.build_model(config, unet_config)
  with config.unlocked():
    config.model.remat = 'none'
  plain_model = release_model.build_model(config, unet_config)  # for the model FLOPs
  step_config = training.build_step_config(config, tiny_sdxl.SDXL_SCHEDULER_CONFIG)
  optimizer = training.create_optimizer(config)
  full = model_lib.param_shapes(model, (4, side, side), 77, n_g, vision_dim)
  base, adapter = adapter_lib.split_params(full)
  dtype = model_lib.DTYPES[dtype_name]
  unet = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), base['unet'])
  adapter = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), adapter)
  state = jax.eval_shape(lambda a: training.create_train_state(a, optimizer,
                                                               jax.random.PRNGKey(0)), adapter)
  f32 = lambda *shape: jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
  c = model.unet.cross_attention_dim
  inputs = (f32(4, side, side), f32(77, c), (f32(n_g, vision_dim), f32(n_l, vision_dim)),
            jax.ShapeDtypeStruct((2,), jnp.uint32),
            {'text_embeds': f32(pooled), 'time_ids': f32(6)})
  def lower(m):
    models = training.Models(model=m, vae=None, text_encoder=None, vision_model=None,
                             scaling_factor=1.0, vision_resize=0, vision_size=0,
                             vision_mean=(0.0,) * 3, vision_std=(1.0,) * 3)

    def step(state, unet, latents, text, image, rng, added):
      return training.adapter_step(state, unet, latents, text, image, rng, models=models,
                                   step_config=step_config, optimizer=optimizer,
                                   added_cond=added)
    return jax.jit(step, donate_argnums=(0,)).lower(state, unet, *inputs)

  t0 = time.perf_counter()
  lowered = lower(model)
  lower_s = time.perf_counter() - t0
  program_flops = common.flops(lowered)
  # Model FLOPs, as for SD 1.5: the step without remat's recomputation.
  flops = program_flops if remat == 'none' else common.flops(lower(plain_model))
  logging.info('lowered in %.1f s (%.3g model FLOP); compiling for the memory analysis',
               lower_s, flops)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  fields = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
            'temp_size_in_bytes', 'generated_code_size_in_bytes')
  memory = {k: int(getattr(mem, k, 0) or 0) for k in fields}
  peak = (memory['argument_size_in_bytes'] + memory['output_size_in_bytes']
          - memory['alias_size_in_bytes'] + memory['temp_size_in_bytes'])
  n_bytes = lambda tree: int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))
  return {
      'benchmark': 'train_step', 'arch': arch, 'mode': 'estimate (CPU compile of shapes)',
      'batch': batch, 'dtype': dtype_name, 'remat': remat, 'attention_impl': 'xla',
      'encoders': 'excluded', 'flops_per_step': flops,
      'program_flops_per_step': program_flops,
      'adapter_params': adapter_lib.count_params(adapter),
      'frozen_unet_params': adapter_lib.count_params(unet),
      'frozen_unet_bytes': n_bytes(unet), 'train_state_bytes': n_bytes(state),
      **memory, 'estimated_peak_bytes': peak,
      'estimated_peak_gib': round(peak / 2**30, 2),
      'lower_s': round(lower_s, 1), 'compile_s': round(compile_s, 1),
  }


def _from_flags() -> dict:
  config = FLAGS.config
  if FLAGS.arch in RELEASE_ARCHS:
    return release_estimate(FLAGS.arch, FLAGS.dtype or 'bfloat16', FLAGS.batch or 1,
                            FLAGS.remat)
  batch = FLAGS.batch if FLAGS.batch is not None else (8 if FLAGS.arch == 'sd15' else 2)
  return run(config, FLAGS.arch, FLAGS.dtype or config.model.dtype, batch, FLAGS.steps,
             FLAGS.warmup, FLAGS.peak_tflops, FLAGS.remat,
             FLAGS.attention_impl or config.model.attention_impl, FLAGS.profile_dir)


def main(argv):
  common.report(argv, _from_flags)


if __name__ == '__main__':
  app.run(main)
