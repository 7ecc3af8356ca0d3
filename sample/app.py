"""A web demo (Gradio) over any pipeline config: upload a subject, pick the word, watch
the influence scope narrow step by step (Fig. 6).

  pip install -c requirements-lock.txt -e '.[demo]'
  python -m sample.app --config=configs/tiny.py       # http://127.0.0.1:7860

  # Your own trained adapter on Stable Diffusion + CLIP (the paper's pipeline):
  python -m sample.app --config=configs/laion.py --pretrained=/models/sd15 \\
      --vision_encoder=/models/clip-vit-l14 --adapter=adapter.safetensors

  # The authors' released SDXL model (configs/release.py; converted adapter):
  python -m sample.app --config=configs/release.py --pretrained=/models/sdxl-base-1.0 \\
      --vision_encoder=/models/realcustom_vision --adapter=realcustom_highres.safetensors

The page takes a subject image, a prompt, the target word (offered from the prompt's
words; any word or phrase of it can be typed), the seed, the number of images, the
steps and the guidance settings (paper: w_t, w_i, gamma_scope, gamma_num, soft or
binary scope; release: its guidance scale, mask_scope, mask strategy and reuse step).
It shows the images, the influence scope above the x0 prediction at a few labelled
steps, the plain text-to-image images from the same initial noise, and the time taken.

The models load and the jitted samplers (RealCustom and plain T2I) compile on one
example before the server starts. Scales, gammas, mask_scope, the reuse step's value
and the seed are traced: changing them never recompiles. Steps, the number of images,
soft/binary, the release mask strategy and turning reuse on or off change the
compiled program: the page says so next to those controls, and the status says
"compiling ... (first use)" while it compiles. Requests queue, one generation at a
time; the server listens on 127.0.0.1 unless --host says otherwise and never opens a
share tunnel. Bad input (no or unreadable image, empty prompt, a word not in the
prompt, a gamma outside [0, 1]) is a one-line message on the page. Flag and config
mistakes end with a one-line message on stderr and exit status 2.
"""
import logging as std_logging
import os
import signal
import socket
import sys
import time
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from realcustom_jax import pipelines
from realcustom_jax.runtime import cli
from sample.demo_inputs import one_line

# The start-up time counts from here: after Python, absl and ml_collections started
# (a fraction of a second), before JAX, Gradio and the models.
_STARTED = time.perf_counter()

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (configs/tiny.py).')
_PRETRAINED, _VISION, _ADAPTER, _ALLOW_PICKLE = cli.define_weight_flags()
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'Address to listen on (0.0.0.0: every '
                            'interface; anyone who can reach it can use the demo).')
_PORT = flags.DEFINE_integer('port', 7860, 'TCP port to listen on.')
_MAX_IMAGES = flags.DEFINE_integer('max_images', 4, 'Most images one request may ask for.')
_MAX_STEPS = flags.DEFINE_integer('max_steps', 0, 'Most sampling steps one request may ask '
                                  'for (each new count compiles once); 0: 50, or the '
                                  "config's steps if more.")
_MAX_FILE_MB = flags.DEFINE_float('max_file_size_mb', 20.0, 'Largest upload accepted (MB).')
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


def _apply_flags(config) -> None:
  """Command-line paths override the config's."""
  cli.apply_weight_flags(config, _PRETRAINED.value, _VISION.value, _ADAPTER.value,
                         _ALLOW_PICKLE.value)


def _check_flags() -> None:
  """The server flags, before anything loads."""
  if not _HOST.value:
    raise UsageError('--host must not be empty (127.0.0.1: this machine only)')
  if not 1 <= _PORT.value <= 65535:
    raise UsageError(f'--port must lie in [1, 65535], got {_PORT.value}')
  if _MAX_IMAGES.value < 1:
    raise UsageError(f'--max_images must be at least 1, got {_MAX_IMAGES.value}')
  if _MAX_STEPS.value < 0:
    raise UsageError(f'--max_steps must be 0 (default) or positive, got {_MAX_STEPS.value}')
  if not _MAX_FILE_MB.value > 0:
    raise UsageError(f'--max_file_size_mb must be positive, got {_MAX_FILE_MB.value}')
  # A taken port would otherwise fail only after the models loaded (minutes for SDXL).
  try:
    with socket.create_server((_HOST.value, _PORT.value)):
      pass
  except OSError as e:
    raise UsageError(f'cannot listen on {_HOST.value}:{_PORT.value}: {e.strerror or e} '
                     '(pick another --port or --host)') from None


def _check_config(config) -> None:
  """The config's sampler settings and weights, before any model loads."""
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  from realcustom_jax import schedules  # pylint: disable=g-import-not-at-top
  sampler.GuidanceSettings.from_config(config.sampler)
  schedules.check_num_steps(config.sampler.num_steps)
  max_steps = _MAX_STEPS.value
  if max_steps and config.sampler.num_steps > max_steps:
    raise UsageError(f'--max_steps={max_steps} is below the config\'s '
                     f'{config.sampler.num_steps} steps')
  message = pipelines.missing_weights_message(config)
  if message:
    raise UsageError(message)


def serve(config):
  """Loads, warms up and starts the server; returns (blocks, url)."""
  from sample import demo_state  # pylint: disable=g-import-not-at-top
  from sample import demo_ui  # pylint: disable=g-import-not-at-top
  family = pipelines.family_for(config)
  start = time.perf_counter()
  logging.info('loading models (%s)', config.get('pretrained', '') or family.tiny_weights)
  pipe = family.pipeline_from_config(config)
  loaded = time.perf_counter()
  logging.info('loaded in %.1f s', loaded - start)
  demo = demo_state.Demo(pipe, _MAX_IMAGES.value, _MAX_STEPS.value, family)
  logging.info('compiling the samplers on one example (%s)', demo.describe(
      demo.ui_key(demo.default_steps, 1, demo.defaults())))
  demo.warm_up()
  logging.info('warmed up in %.1f s (compile included)', demo.compile_seconds)
  blocks = demo_ui.build_ui(demo)
  url = demo_ui.launch(blocks, _HOST.value, _PORT.value, _MAX_FILE_MB.value)
  logging.info('ready: %s (start-up %.1f s since the process started: models %.1f s, '
               'compile and warm-up %.1f s)', url, time.perf_counter() - _STARTED,
               loaded - start, demo.compile_seconds)
  return blocks, url


def _stop_on_sigterm() -> None:
  """SIGTERM shuts the server down as Ctrl-C does."""
  def handler(signum, frame):
    del signum, frame
    raise KeyboardInterrupt
  signal.signal(signal.SIGTERM, handler)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    _fail('--config is required (e.g. --config=configs/tiny.py)')
  config = _CONFIG.value
  try:
    _check_flags()
  except UsageError as e:
    _fail(str(e))
  _apply_flags(config)
  cli.enable_compile_cache()  # before the first compile
  if not (_ALLOW_PICKLE.value or config.get('allow_pickle', False)
          or (not _PRETRAINED.value and pipelines.needs_torch(config))):
    cli.skip_torch()
  os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # no calls home
  try:
    import gradio  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    _fail("the demo needs gradio: pip install -c requirements-lock.txt -e '.[demo]'")
  warnings.showwarning = _show_warning
  # Gradio answers every gr.Error through a constant Starlette deprecates: not ours.
  warnings.filterwarnings('ignore', message=".*'HTTP_422_UNPROCESSABLE_ENTITY' is deprecated")
  cli.quiet_libraries()
  logging.set_verbosity(logging.INFO)
  for name in ('httpx', 'httpcore'):  # Gradio's own requests to itself at start-up
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  try:
    _check_config(config)
    blocks, _ = serve(config)
  except ValueError as e:  # UsageError, bad gammas or steps, unusable weights
    _fail(one_line(e))
  except OSError as e:  # the port was taken meanwhile
    _fail(f'cannot start the server: {one_line(e)}')
  _stop_on_sigterm()
  try:
    while blocks.is_running:  # until Ctrl-C or SIGTERM
      time.sleep(0.2)
  except KeyboardInterrupt:
    pass
  start = time.perf_counter()
  blocks.close(verbose=False)
  logging.info('server stopped in %.1f s', time.perf_counter() - start)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('error: '))
