"""Times the train step with the frozen encoders in it against the step on precomputed
features, side by side on one device (or data-parallel over `--num_devices`).

  python -m benchmarks.precompute_speed --config=configs/tiny.py
  python -m benchmarks.precompute_speed --config=configs/tiny.py --arch=sd15 \\
      --dtype=bfloat16 --batch=8

In-step (`training.train_step`, what training runs by default): the VAE encoder and
posterior draw at the image resolution, CLIP text and CLIP vision, then the adapter
step. Precomputed (`training.precomputed_train_step`, `config.data.precompute_features`):
z_0 drawn from stored posterior moments, then the same adapter step. Both get their
batch already on the device, so host-to-device copies are not timed (the image batch is
the larger one: `batch_bytes_*`). The two steps compile concurrently (two threads; XLA
compiles outside the GIL), so each `compile_s_*` is a wall time that overlaps the other.

'sd15': the SD 1.5 UNet, VAE (512 px) and CLIP ViT-L/14 text and vision towers with
RANDOM weights drawn on the host (no files, no init compile); 'tiny': the config's tiny
models. The frozen models are held and computed in `--dtype`; the stored features are
`--feature_dtype`.

The LAST line printed is the JSON result.
"""
import concurrent.futures
import time

from absl import app
from absl import flags
from absl import logging
from diffusers import FlaxAutoencoderKL
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
from transformers import CLIPTextConfig
from transformers import CLIPVisionConfig

from benchmarks import common
from realcustom_jax import adapter as adapter_lib
from realcustom_jax import clip
from realcustom_jax.runtime import sharding
from realcustom_jax.loading import tiny
from realcustom_jax import adapter_training as training
from realcustom_jax.loading import weights

FLAGS = flags.FLAGS

# stable-diffusion-v1-5 vae/config.json and clip-vit-large-patch14's text / vision configs.
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4,
    up_block_types=('UpDecoderBlock2D',) * 4, block_out_channels=(128, 256, 512, 512),
    layers_per_block=2, act_fn='silu', latent_channels=4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215)
CLIP_L14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu',
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_L14_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, hidden_act='quick_gelu')
_KEY = jax.ShapeDtypeStruct((2,), np.uint32)  # eval_shape needs only the key's shape


def _define_flags() -> None:
  """Defined only when run as a program, so tests can import `run`."""
  config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.')
  flags.DEFINE_enum('arch', 'tiny', ['tiny', 'sd15'], 'The config\'s tiny models, or '
                    'SD 1.5 + CLIP ViT-L/14 at 512 px with random weights.')
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                    'Frozen models\' dtype; default config.model.dtype.')
  flags.DEFINE_enum('feature_dtype', None, ['float16', 'bfloat16', 'float32'],
                    'Stored features\' dtype; default config.data.feature_dtype.')
  flags.DEFINE_integer('batch', None, 'Batch size; default 2 (tiny) / 8 (sd15).')
  flags.DEFINE_integer('steps', 10, 'Timed steps per round.')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps after compilation.')
  flags.DEFINE_integer('rounds', 2, 'Alternating timing rounds; the best round counts.')
  flags.DEFINE_integer('num_devices', 1, 'Data-parallel over the first N devices (the '
                       'batch a multiple of N).')


def _encoders(config, arch: str):
  """(vae, vae params, text model, text params, vision model, vision params, Models kw)."""
  if arch == 'tiny':
    sd, vision = tiny.build_tiny_components(config)
    return (sd.vae, sd.vae_params, sd.text_encoder, sd.text_params, vision.model,
            vision.params, dict(scaling_factor=sd.scaling_factor,
                                vision_resize=vision.resize_size, vision_size=vision.image_size,
                                vision_mean=vision.mean, vision_std=vision.std))
  vae = FlaxAutoencoderKL.from_config(SD15_VAE)
  text = clip.CLIPTextModel(clip.CLIPConfig.from_dict(CLIPTextConfig(**CLIP_L14_TEXT)))
  vision = clip.CLIPVisionModel(clip.CLIPConfig.from_dict(
      CLIPVisionConfig(**CLIP_L14_VISION)))
  size = CLIP_L14_VISION['image_size']
  return (vae, tiny.host_random_params(jax.eval_shape(vae.init_weights, _KEY), 1),
          text, tiny.random_tower_params(text, 2), vision, tiny.random_tower_params(vision, 3),
          dict(scaling_factor=SD15_VAE['scaling_factor'], vision_resize=size,
               vision_size=size, vision_mean=weights.CLIP_MEAN, vision_std=weights.CLIP_STD))


def _time(fn, state, frozen, batch, steps: int) -> tuple[float, dict]:
  """Seconds for `steps` steps; returns (seconds, the new state)."""
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = fn(state, frozen, batch)
  jax.block_until_ready((state, metrics))
  return time.perf_counter() - t0, state


def run(config, arch: str, dtype_name: str, feature_dtype: str, batch: int, steps: int,
        warmup: int, rounds: int = 2, num_devices: int = 1) -> dict:
  """Builds, compiles and times both steps; returns the result dict.

  Raises:
    ValueError: for a non-positive batch, step, round or device count, a negative
      warm-up, more devices than there are, or a batch they do not divide.
  """
  for name, value, least in (('batch', batch, 1), ('steps', steps, 1),
                             ('warmup', warmup, 0), ('rounds', rounds, 1),
                             ('num_devices', num_devices, 1)):
    if value < least:
      raise ValueError(f'--{name} must be >= {least}, got {value}')
  if num_devices > jax.device_count() or batch % num_devices:
    raise ValueError(f'--num_devices={num_devices} must be at most the {jax.device_count()} '
                     f'devices and divide --batch={batch}')
  a = common.arch(config, arch)
  model = common.build_model(config, a, dtype=dtype_name)
  vae, vae_params, text, text_params, vision, vision_params, kw = _encoders(config, arch)
  models = training.Models(model=model, vae=vae, text_encoder=text, vision_model=vision, **kw)
  config = config.copy_and_resolve_references()
  config.train.frozen_dtype = dtype_name
  step_config = training.build_step_config(config, tiny.SCHEDULER_CONFIG)

  # ---- Random weights drawn on the host, placed on the devices ----
  base, adapter = adapter_lib.split_params(adapter_lib.init_visual_kv_from_text(
      common.random_params(model, a, seed=0)))
  mesh = sharding.create_mesh({'data': num_devices, 'fsdp': 1}, jax.devices()[:num_devices])
  setup = training.place_train_setup(
      config, mesh, models, step_config, adapter,
      {'unet': base['unet'], 'vae': vae_params, 'text': text_params, 'vision': vision_params})
  frozen = {'in_step': setup.frozen, 'precomputed': {'unet': setup.frozen['unet']}}

  # ---- The two batches: images + token ids, and what the encoders make of them ----
  rng = np.random.default_rng(0)
  side = a.latent[1] * 2 ** (len(vae.config.block_out_channels) - 1)
  images = {'image': rng.uniform(-1, 1, (batch, side, side, 3)).astype(np.float32),
            'input_ids': rng.integers(0, text.config.vocab_size, (batch, a.text[0]),
                                      dtype=np.int32)}
  shapes = jax.eval_shape(lambda f, b: training.encode_features(f, b, models),
                          setup.frozen, images)
  stored = jnp.dtype(feature_dtype)
  features = {k: rng.standard_normal(s.shape, np.float32) for k, s in shapes.items()}
  features['latent_std'] = 0.01 * np.abs(features['latent_std'])  # a posterior std > 0
  features = {k: v.astype(stored) for k, v in features.items()}
  images, features = (sharding.device_put_tree(b, setup.batch_sharding(b))
                      for b in (images, features))

  # ---- Compile both, concurrently ----
  logging.info('compiling both steps (%s, batch %d)', arch, batch)
  batches = {'in_step': images, 'precomputed': features}
  lowered = {k: setup.train_step(b, precomputed=k == 'precomputed').lower(
      setup.state, frozen[k], b) for k, b in batches.items()}

  def compile_timed(name):
    t0 = time.perf_counter()
    compiled = lowered[name].compile()
    return compiled, time.perf_counter() - t0

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    done = dict(zip(lowered, pool.map(compile_timed, lowered)))
  compile_wall_s = time.perf_counter() - t0
  fns = {k: c for k, (c, _) in done.items()}
  # Each variant steps its own copy of the state (the steps donate it).
  states = {k: jax.tree.map(jnp.copy, setup.state) for k in fns}

  # ---- Time, alternating rounds; the best round of each counts ----
  for k in fns:
    _, states[k] = _time(fns[k], states[k], frozen[k], batches[k], warmup)
  best = {k: float('inf') for k in fns}
  for _ in range(rounds):
    for k in fns:
      seconds, states[k] = _time(fns[k], states[k], frozen[k], batches[k], steps)
      best[k] = min(best[k], seconds)
  rate = {k: steps / best[k] for k in fns}
  nbytes = lambda b: int(sum(x.nbytes for x in jax.tree.leaves(b)))
  return {
      'benchmark': 'precompute', 'arch': arch, 'device_kind': jax.devices()[0].device_kind,
      'platform': jax.devices()[0].platform, 'num_devices': num_devices, 'batch': batch,
      'dtype': dtype_name, 'feature_dtype': feature_dtype,
      'in_step_steps_per_sec': round(rate['in_step'], 4),
      'precomputed_steps_per_sec': round(rate['precomputed'], 4),
      'speedup': round(rate['precomputed'] / rate['in_step'], 4),
      'in_step_ms': round(1000 / rate['in_step'], 3),
      'precomputed_ms': round(1000 / rate['precomputed'], 3),
      'compile_s_in_step': round(done['in_step'][1], 2),
      'compile_s_precomputed': round(done['precomputed'][1], 2),
      'compile_wall_s': round(compile_wall_s, 2),
      'batch_bytes_in_step': nbytes(images), 'batch_bytes_precomputed': nbytes(features),
      'feature_bytes_per_sample': nbytes(features) // batch,
      'steps': steps, 'rounds': rounds,
  }


def _from_flags() -> dict:
  config = FLAGS.config
  batch = FLAGS.batch if FLAGS.batch is not None else (8 if FLAGS.arch == 'sd15' else 2)
  return run(config, FLAGS.arch, FLAGS.dtype or config.model.dtype,
             FLAGS.feature_dtype or config.data.feature_dtype, batch, FLAGS.steps,
             FLAGS.warmup, FLAGS.rounds, FLAGS.num_devices)


def main(argv):
  common.report(argv, _from_flags)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
