"""Generate one customized image from a subject image, a prompt and a target word.

  python -m sample.main --config=configs/tiny.py --subject=toy.png \\
      --prompt="a toy on the beach" --word=toy --out=out.png --mask_grid=grid.png

  # The authors' released SDXL model (configs/release.py; converted adapter):
  python -m sample.main --config=configs/release.py --pretrained=/models/sdxl-base-1.0 \\
      --vision_encoder=/models/realcustom_vision --adapter=realcustom_highres.safetensors \\
      --subject=dog.jpg --prompt="a dog wearing a spacesuit" --word=dog --out=out.png

  # A local Stable Diffusion + CLIP vision model and a trained adapter:
  python -m sample.main --config=configs/tiny.py --pretrained=/models/sd15 \\
      --vision_encoder=/models/clip-vit-l14 --adapter=adapter.safetensors \\
      --config.resolution=512 --config.sampler.num_steps=50 ...

User mistakes (missing or unreadable subject, a word not in the prompt, a gamma outside
[0, 1], an unwritable output path, unusable weights) end with a one-line message on
stderr and exit status 2.
"""
import os
import sys
import time
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from realcustom_jax import pipelines
from realcustom_jax.runtime import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/tiny.py).')
_SUBJECT = flags.DEFINE_string('subject', None, 'Subject image file.')
_PROMPT = flags.DEFINE_string('prompt', None, 'Prompt, containing --word.')
_WORD = flags.DEFINE_string('word', None, 'Target real word in the prompt (e.g. "toy").')
_OUT = flags.DEFINE_string('out', None, 'Output image file (.png, .jpg).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the initial noise.')
_PRETRAINED, _VISION, _ADAPTER, _ALLOW_PICKLE = cli.define_weight_flags()
_MASK_GRID = flags.DEFINE_string('mask_grid', None, 'Also write a Fig. 6-style grid of '
                                 'the influence scope and x0 prediction per step.')
cli.define_compile_cache_flags()


class UsageError(ValueError):
  """A mistake in the command line."""


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _show_warning(message, category, filename, lineno, file=None, line=None):
  """Warnings (untrained adapter, truncated prompt) as one log line each."""
  del filename, lineno, file, line
  logging.warning('%s: %s', category.__name__, message)


def _check_output(path: str, flag: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  ext = os.path.splitext(path)[1].lower()
  if ext not in Image.registered_extensions():
    raise UsageError(f'--{flag}={path}: unknown image extension {ext!r} (use .png or .jpg)')
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise UsageError(f'--{flag}={path}: directory {folder} does not exist')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise UsageError(f'--{flag}={path}: directory {folder} is not writable')
  if os.path.isdir(path) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UsageError(f'--{flag}={path}: not a writable file')


def _apply_flags(config) -> None:
  """Command-line paths override the config's."""
  cli.apply_weight_flags(config, _PRETRAINED.value, _VISION.value, _ADAPTER.value,
                         _ALLOW_PICKLE.value)


def run(config) -> None:
  """Validates the inputs, then loads, samples, decodes and writes the image(s)."""
  for flag in (_SUBJECT, _PROMPT, _WORD, _OUT):
    if not flag.value:
      raise UsageError(f'--{flag.name} is required')
  _apply_flags(config)
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  from realcustom_jax import schedules  # pylint: disable=g-import-not-at-top
  # Checked before any model loads, and made once: the pipeline call takes them as they are.
  settings = sampler.GuidanceSettings.from_config(config.sampler)
  schedules.check_num_steps(config.sampler.num_steps)
  if not 0 <= _SEED.value < 2**32:
    raise UsageError(f'--seed must lie in [0, 2**32), got {_SEED.value}')
  _check_output(_OUT.value, 'out')
  if _MASK_GRID.value:
    _check_output(_MASK_GRID.value, 'mask_grid')

  from realcustom_jax.loading import images  # pylint: disable=g-import-not-at-top
  subject = images.load_subject_image(_SUBJECT.value)
  logging.info('subject %s: %dx%d', _SUBJECT.value, *subject.size)
  family = pipelines.family_for(config)
  missing_weights = family.missing_weights_message(config)
  if missing_weights:  # before the tiny models fail on the resolution
    raise UsageError(missing_weights)
  family.check_word(config, _PROMPT.value, _WORD.value)  # before any model loads

  from realcustom_jax import pipeline_common  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  logging.info('loading models (%s)', config.pretrained or family.tiny_weights)
  pipe = family.pipeline_from_config(config)
  logging.info('loaded in %.1f s', time.perf_counter() - start)

  start = time.perf_counter()
  out = pipe([subject], [_PROMPT.value], [_WORD.value], seed=_SEED.value, settings=settings,
             return_masks=bool(_MASK_GRID.value))
  logging.info('generated in %.1f s (compile included)', time.perf_counter() - start)
  try:
    out.images[0].save(_OUT.value)
    logging.info('wrote %s', _OUT.value)
    if _MASK_GRID.value:
      pipeline_common.save_mask_grid(out, _MASK_GRID.value)
      logging.info('wrote %s', _MASK_GRID.value)
  except OSError as e:
    raise UsageError(f'cannot write output: {e}') from None


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    _fail('--config is required (e.g. --config=configs/tiny.py)')
  cli.enable_compile_cache()  # before the first compile
  if not (_ALLOW_PICKLE.value or _CONFIG.value.get('allow_pickle', False)
          or (not _PRETRAINED.value and pipelines.needs_torch(_CONFIG.value))):
    cli.skip_torch()
  warnings.showwarning = _show_warning
  cli.quiet_libraries()
  logging.set_verbosity(logging.INFO)
  try:
    run(_CONFIG.value)
  except ValueError as e:  # UsageError, ImageInputError, CheckpointError, bad words/gammas
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('error: '))
