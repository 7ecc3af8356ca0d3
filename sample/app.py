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
import dataclasses
import logging as std_logging
import os
import re
import signal
import socket
import sys
import threading
import time
from typing import Any, NamedTuple, Optional, Sequence
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from realcustom_jax.release import paths as release_paths
from realcustom_jax.runtime import cli

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

# The example the samplers are warmed on, and the page's first values.
DEFAULT_PROMPT = 'a toy on the beach'
DEFAULT_WORD = 'toy'
# Uploads with more pixels are refused before decoding (load_subject_image then
# downscales what is left to 2048 px): 40 MP is an 8K photo and 120 MB decoded.
MAX_SUBJECT_PIXELS = 40_000_000
# Columns of the scope strip: this many steps evenly spaced, the last included (Fig. 6).
STRIP_COLUMNS = 5
_STRIP_TILE = 96  # px: tiny 32 px outputs are upscaled, SDXL's 1024 px downscaled
_STRIP_MARGIN = 52  # px: the row labels on the left
_STRIP_HEADER = 18  # px: the step labels on top
# Not offered as target words (they can still be typed).
_STOP_WORDS = frozenset(
    'a an the of on in at to with and or by for from as is are was were be its it his her '
    'their this that these those into onto over under near next beside behind above below '
    'some very'.split())
_WORD = re.compile(r"[^\W_](?:[\w'-]*[^\W_])?")


class UsageError(ValueError):
  """A mistake in the command line."""


class RequestError(ValueError):
  """A mistake in a request from the page (shown there as one line)."""


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _one_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
  """Warnings (untrained adapter, truncated prompt) as one log line each."""
  del filename, lineno, file, line
  logging.warning('%s: %s', category.__name__, message)


# ---------------------------------------------------------------------------------
# Words, uploads, the scope strip (no JAX, no Gradio)
# ---------------------------------------------------------------------------------


def word_choices(prompt: str) -> list[str]:
  """The target words offered for `prompt`: its words (function words left out), then
  its two-word phrases ("teddy bear"), each once, in prompt order.

  Args:
    prompt: the prompt.

  Returns:
    The choices; any other word or phrase of the prompt can still be typed.
  """
  matches = list(_WORD.finditer(prompt or ''))
  words = [m.group(0) for m in matches]
  content = [w.lower() not in _STOP_WORDS for w in words]
  choices = [w for w, c in zip(words, content) if c]
  # Neighbours with only spaces between them ("teddy bear", not "dog, wearing").
  choices += [f'{a.group(0)} {b.group(0)}' for a, b, ca, cb in zip(
      matches, matches[1:], content, content[1:])
              if ca and cb and prompt[a.end():b.start()].isspace()]
  if not choices:  # a prompt of function words only: offer them all
    choices = words
  return list(dict.fromkeys(choices))


def pick_word(prompt: str, current: Optional[str], choices: Sequence[str]) -> str:
  """The word to show after the prompt changed: the current one while the prompt still
  holds it, else the first choice (the first content word: "toy" in "a toy on ...")."""
  if current and current.strip() and current.lower() in (prompt or '').lower():
    return current
  return choices[0] if choices else ''


def load_upload(upload: Any):
  """The subject image of an upload (Gradio's file payload, or a path), as RGB.

  The same checks as `sample.main`'s --subject (`loading.images.load_subject_image`:
  unreadable, non-image, corrupt or truncated files; images over 2048 px downscaled),
  plus a pixel limit read from the header before anything is decoded.

  Args:
    upload: None, a path, or a dict with 'path' (and 'orig_name').

  Returns:
    A PIL RGB image.

  Raises:
    RequestError: one line naming the file as the user named it.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import images  # pylint: disable=g-import-not-at-top
  if upload is None:
    raise RequestError('upload a subject image first')
  if isinstance(upload, dict):
    path, name = upload.get('path'), upload.get('orig_name')
  else:
    path, name = os.fspath(upload), None
  if not path:
    raise RequestError('upload a subject image first')
  name = name or os.path.basename(path)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      with Image.open(path) as header:  # reads the header only
        width, height = header.size
  except Image.DecompressionBombError:
    width = height = None  # over PIL's own limit: refused below without a size
  except (OSError, SyntaxError, ValueError):
    width = height = 0  # not an image: load_subject_image says so
  if width is None or width * height > MAX_SUBJECT_PIXELS:
    size = f' is {width}x{height} pixels' if width else ' has too many pixels'
    raise RequestError(f'subject image {name}{size}: the demo takes images up to '
                       f'{MAX_SUBJECT_PIXELS / 1e6:.0f} megapixels')
  try:
    return images.load_subject_image(path)
  except images.ImageInputError as e:
    raise RequestError(_one_line(e).replace(path, name)) from None


def strip_steps(num_steps: int, columns: int = STRIP_COLUMNS) -> list[int]:
  """`columns` step indices evenly spaced over `num_steps`, first and last included."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return sorted({int(round(s)) for s in np.linspace(0, num_steps - 1,
                                                    min(columns, num_steps))})


def scope_strip(masks, x0, steps: Sequence[int], num_steps: int):
  """A Fig. 6-style strip: per image, the scope (grey) above the x0 prediction, at the
  given steps, labelled.

  Args:
    masks: (len(steps), B, H, W) float scope in [0, 1] at those steps.
    x0: (len(steps), B, h, w, 3) uint8 decoded x0 predictions at those steps.
    steps: the step indices (0-based) shown.
    num_steps: the run's step count (for the labels).

  Returns:
    A PIL RGB image.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  batch = x0.shape[1]
  tile_w = _STRIP_TILE
  tile_h = max(1, round(_STRIP_TILE * x0.shape[2] / x0.shape[3]))  # the images' aspect
  gap = 4
  band = 2 * tile_h + gap
  strip = Image.new('RGB', (_STRIP_MARGIN + len(steps) * (tile_w + gap),
                            _STRIP_HEADER + batch * band), (235, 235, 235))
  draw = ImageDraw.Draw(strip)
  font = ImageFont.load_default(size=12)
  for col, step in enumerate(steps):
    left = _STRIP_MARGIN + col * (tile_w + gap)
    draw.text((left + 2, 2), f'step {step + 1}/{num_steps}', fill='black', font=font)
    for row in range(batch):
      top = _STRIP_HEADER + row * band
      mask = np.round(np.clip(masks[col, row], 0.0, 1.0) * 255).astype(np.uint8)
      strip.paste(Image.fromarray(mask, 'L').resize((tile_w, tile_h),
                                                    Image.Resampling.NEAREST), (left, top))
      strip.paste(Image.fromarray(x0[col, row]).resize((tile_w, tile_h),
                                                       Image.Resampling.BILINEAR),
                  (left, top + tile_h))
  for row in range(batch):
    top = _STRIP_HEADER + row * band
    prefix = f'#{row + 1} ' if batch > 1 else ''
    draw.text((4, top + tile_h // 2 - 6), prefix + 'scope', fill='black', font=font)
    draw.text((4, top + tile_h + tile_h // 2 - 6), prefix + 'x0', fill='black', font=font)
  return strip


def _number(name: str, value, integer: bool = False):
  """A request's number (the page's sliders, or an API caller's anything) checked."""
  if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
    raise RequestError(f'{name} must be a number, got {value!r}')
  try:
    number = float(value)
  except (TypeError, ValueError):
    raise RequestError(f'{name} must be a number, got {value!r}') from None
  if number != number or number in (float('inf'), float('-inf')):
    raise RequestError(f'{name} must be finite, got {value!r}')
  if integer:
    if number != int(number):
      raise RequestError(f'{name} must be a whole number, got {value!r}')
    return int(number)
  return number


# ---------------------------------------------------------------------------------
# The demo: one pipeline, its compiled samplers, one generation at a time
# ---------------------------------------------------------------------------------


class StaticKey(NamedTuple):
  """What selects a compiled sampler program (anything else is traced)."""
  num_steps: int
  batch: int
  binary_mask: bool
  mask_strategy: Any
  reuse: bool


@dataclasses.dataclass
class Request:
  """A checked request."""
  subject: Any  # PIL image
  prompt: str
  word: str
  seed: int
  batch: int
  num_steps: int
  settings: Any  # sampler.GuidanceSettings


@dataclasses.dataclass
class Generation:
  """What one request gives.

  Attributes:
    images: B RealCustom images.
    plain: B plain text-to-image images from the same initial noise.
    strip: the scope strip (`scope_strip`).
    seconds: {'realcustom', 'plain', 'decode', 'total'} wall times.
    new_programs: sampler programs compiled by this request (0: none).
    key: its StaticKey.
  """
  images: list
  plain: list
  strip: Any
  seconds: dict
  new_programs: int
  key: StaticKey


class Demo:
  """A loaded pipeline, the settings the page can change, and its compiled samplers.

  Attributes:
    pipe: the `pipelines.load_pipeline` pipeline.
    release: whether it is the authors' release (SDXL) pipeline.
    max_images, max_steps: the request limits.
    compiled: the StaticKeys run so far (their programs are compiled).
    compile_seconds: how long the warm-up took (compile included), once warmed.
  """

  def __init__(self, pipe, max_images: int = 4, max_steps: int = 0):
    """Wraps `pipe`.

    Args:
      pipe: a `RealCustomPipeline` or a `ReleasePipeline`.
      max_images: most images per request.
      max_steps: most steps per request; 0: 50, or the config's steps if more.
    """
    from realcustom_jax.release import pipeline as release_pipeline  # pylint: disable=g-import-not-at-top
    self.pipe = pipe
    self.release = isinstance(pipe, release_pipeline.ReleasePipeline)
    self.max_images = int(max_images)
    self.default_steps = int(pipe.config.sampler.num_steps)
    self.max_steps = int(max_steps) or max(50, self.default_steps)
    self.compiled: set[StaticKey] = set()
    self.compile_seconds: Optional[float] = None
    self._lock = threading.Lock()  # one generation at a time, whoever calls

  # ---- Settings ----

  def defaults(self) -> dict[str, Any]:
    """The page's first values: the config's sampler settings."""
    s = self.pipe.config.sampler
    if self.release:
      strategy = s.get('mask_strategy', 'paper')
      return dict(guidance_scale=float(s.get('guidance_image', 3.5)),
                  mask_scope=float(s.get('gamma_scope', 0.25)),
                  mask_strategy=[strategy] if isinstance(strategy, str) else list(strategy),
                  mask_reused_step=int(s.get('mask_reused_step', None) or 0))
    return dict(guidance_text=float(s.get('guidance_text', 7.5)),
                guidance_image=float(s.get('guidance_image', 12.5)),
                gamma_scope=float(s.get('gamma_scope', 0.25)),
                gamma_num=float(s.get('gamma_num', 0.8)),
                scope='binary' if s.get('binary_mask', False) else 'soft')

  def settings(self, **controls):
    """Checked GuidanceSettings from the page's controls (`defaults()`'s keys).

    Raises:
      RequestError: a value that is not a number, a gamma outside [0, 1], an unknown
        or empty mask strategy.
    """
    from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
    sampler_config = self.pipe.config.sampler
    try:
      if self.release:
        modes = controls['mask_strategy']
        modes = [modes] if isinstance(modes, str) else list(modes or [])
        if not modes:
          raise RequestError('pick at least one mask strategy mode (the release: max_norm)')
        reuse = _number('mask_reused_step', controls['mask_reused_step'], integer=True)
        if reuse < 0:
          raise RequestError(f'mask_reused_step must be 0 (off) or a step >= 1, got {reuse}')
        settings = sampler.GuidanceSettings.from_config(
            sampler_config, guidance_image=_number('guidance scale',
                                                   controls['guidance_scale']),
            gamma_scope=_number('mask_scope', controls['mask_scope']),
            mask_strategy=tuple(modes), mask_reused_step=reuse or None)
        return settings if reuse else settings.replace(mask_reused_step=None)
      scope = controls['scope']
      if scope not in ('soft', 'binary'):
        raise RequestError(f"scope must be 'soft' or 'binary', got {scope!r}")
      return sampler.GuidanceSettings.from_config(
          sampler_config, guidance_text=_number('w_t', controls['guidance_text']),
          guidance_image=_number('w_i', controls['guidance_image']),
          gamma_scope=_number('gamma_scope', controls['gamma_scope']),
          gamma_num=_number('gamma_num', controls['gamma_num']),
          binary_mask=scope == 'binary')
    except RequestError:
      raise
    except ValueError as e:  # GuidanceSettings' own checks: gammas, modes
      raise RequestError(_one_line(e)) from None

  @staticmethod
  def static_key(num_steps: int, batch: int, settings) -> StaticKey:
    return StaticKey(int(num_steps), int(batch), bool(settings.binary_mask),
                     settings.mask_strategy, settings.mask_reused_step is not None)

  def describe(self, key: StaticKey) -> str:
    """'3 steps x 1 image, soft scope' (what selects the compiled program)."""
    text = f'{key.num_steps} steps x {key.batch} image{"s" if key.batch > 1 else ""}'
    if self.release:
      modes = key.mask_strategy if isinstance(key.mask_strategy, str) else '+'.join(
          key.mask_strategy)
      return f'{text}, mask {modes}, reuse {"on" if key.reuse else "off"}'
    return f'{text}, {"binary" if key.binary_mask else "soft"} scope'

  def compile_note(self, key: Optional[StaticKey]) -> str:
    """The note next to the controls that change the compiled program."""
    static = ('Steps, number of images, mask strategy and reuse on/off'
              if self.release else 'Steps, number of images and soft/binary')
    first = (f' (start-up compile: {self.compile_seconds:.0f} s)'
             if self.compile_seconds is not None else '')
    if key is None:
      now = ''
    elif key in self.compiled:
      now = f'**{self.describe(key)}: compiled, runs at once.** '
    else:
      now = f'**{self.describe(key)}: compiles once on first use{first}.** '
    return (f'{now}{static} select the compiled sampler: each new combination compiles '
            'once. Scales, gammas and the seed never recompile.')

  def check_request(self, subject, prompt, word, seed, num_images, num_steps,
                    controls: dict) -> Request:
    """Every check of a request, before anything runs.

    Raises:
      RequestError: one line for the page.
    """
    from realcustom_jax import schedules  # pylint: disable=g-import-not-at-top
    image = load_upload(subject)
    if not isinstance(prompt, str) or not prompt.strip():
      raise RequestError('type a prompt (e.g. "a toy on the beach")')
    if not isinstance(word, str) or not word.strip():
      raise RequestError('pick the target word: a word or phrase of the prompt')
    word = word.strip()
    self.check_word(prompt, word)
    seed = _number('seed', seed, integer=True)
    if not 0 <= seed < 2**32:
      raise RequestError(f'seed must lie in [0, 2**32), got {seed}')
    batch = _number('number of images', num_images, integer=True)
    if not 1 <= batch <= self.max_images:
      raise RequestError(f'number of images must lie in [1, {self.max_images}], got {batch}')
    steps = _number('steps', num_steps, integer=True)
    if not 1 <= steps <= self.max_steps:  # each new count compiles: bounded by the server
      raise RequestError(f'steps must lie in [1, {self.max_steps}] (the --max_steps of this '
                         f'server), got {steps}')
    try:
      schedules.check_num_steps(steps)
    except ValueError as e:
      raise RequestError(_one_line(e)) from None
    return Request(image, prompt, word, seed, batch, steps, self.settings(**controls))

  def check_word(self, prompt: str, word: str) -> None:
    """RequestError unless the pipeline finds `word` in `prompt` (as it would when
    encoding: whole words for the paper's CLIP tokenizer, `str.find` for the release)."""
    try:
      if self.release:
        from realcustom_jax.release import pipeline as release_pipeline  # pylint: disable=g-import-not-at-top
        release_pipeline.target_token_weights(self.pipe.sdxl.tokenizer,
                                              self.pipe.sdxl.tokenizer_2, prompt, word)
      else:
        from realcustom_jax import encoders  # pylint: disable=g-import-not-at-top
        encoders.word_token_indices(self.pipe.components.tokenizer, prompt, word)
    except ValueError as e:
      raise RequestError(_one_line(e)) from None

  # ---- Generation ----

  def sampler_programs(self) -> int:
    """Compiled executables of the two jitted samplers (the no-retrace counter)."""
    from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
    model = self.pipe.model
    # pylint: disable=protected-access
    return (sampler.cached_sampler(model, True)._cache_size()
            + sampler.cached_cfg_sampler(model, False)._cache_size())

  def generate(self, request: Request) -> Generation:
    """Runs RealCustom and plain T2I from the same initial noise, decodes, builds the strip.

    Raises:
      ValueError: what the pipeline refuses (e.g. a mask mode this UNet cannot serve).
    """
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
    pipe, b = self.pipe, request.batch
    with self._lock:
      before = self.sampler_programs()
      start = time.perf_counter()
      schedule = pipe.schedule(request.num_steps)
      conditions = pipe.encode([request.subject], [request.prompt] * b, [request.word] * b)
      latents = pipe.initial_latents(request.seed, b) * schedule.init_noise_sigma
      out = sampler.sample(pipe.model, pipe.params, schedule, latents, conditions,
                           request.settings, return_trajectory=True)
      jax.block_until_ready(out.latents)
      sampled = time.perf_counter()
      # Plain classifier-free guidance from the same z_T: the paper's w_t, or the
      # release's single scale (with its negative prompt). Fresh settings with default
      # static fields, so that soft/binary or the mask strategy never recompile it.
      scale = request.settings.guidance_image if self.release else (
          request.settings.guidance_text)
      plain = sampler.cfg_sample(pipe.model, pipe.params, schedule, latents, conditions,
                                 sampler.GuidanceSettings.create(guidance_text=scale))
      jax.block_until_ready(plain.latents)
      plain_done = time.perf_counter()
      steps = strip_steps(request.num_steps)
      images = [Image.fromarray(x) for x in pipe.decode(out.latents)]
      plain_images = [Image.fromarray(x) for x in pipe.decode(plain.latents)]
      # Full-batch decodes: the same VAE program as the images' (no compile per row).
      x0 = np.stack([pipe.decode(out.x0[s]) for s in steps])
      strip = scope_strip(np.asarray(out.masks)[steps], x0, steps, request.num_steps)
      end = time.perf_counter()
      key = self.static_key(request.num_steps, b, request.settings)
      self.compiled.add(key)
      new = self.sampler_programs() - before
    seconds = dict(realcustom=sampled - start, plain=plain_done - sampled,
                   decode=end - plain_done, total=end - start)
    logging.info('generated %d image(s), %s: %.2f s (%s)', b, self.describe(key),
                 seconds['total'], f'{new} new sampler program(s)' if new else 'no recompile')
    return Generation(images, plain_images, strip, seconds, new, key)

  def status(self, result: Generation) -> str:
    """The page's status line for a finished generation."""
    s = result.seconds
    compiled = (f'compiled {result.new_programs} new sampler program(s) (first use)'
                if result.new_programs else 'no recompile')
    n = result.key.batch
    return (f'generated {n} image{"s" if n > 1 else ""} in {s["total"]:.2f} s '
            f'(RealCustom {s["realcustom"]:.2f} s, plain T2I {s["plain"]:.2f} s, decode '
            f'and strip {s["decode"]:.2f} s); {self.describe(result.key)}; {compiled}; '
            f'sampler programs: {self.sampler_programs()}')

  def example_subject(self):
    """The warm-up subject: a red disc on blue (what `make demo` draws)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top
    from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
    image = Image.new('RGB', (64, 64), 'blue')
    ImageDraw.Draw(image).ellipse((14, 14, 50, 50), fill='red')
    return image

  def warm_up(self) -> Generation:
    """Compiles both samplers (and the encoders and decoder) on the page's first values."""
    start = time.perf_counter()
    settings = self.settings(**self.defaults())
    result = self.generate(Request(self.example_subject(), DEFAULT_PROMPT, DEFAULT_WORD, 0,
                                   1, self.default_steps, settings))
    self.compile_seconds = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------


def _title(demo: Demo) -> str:
  config = demo.pipe.config
  kind = "the authors' release (SDXL)" if demo.release else "the paper's pipeline (SD + CLIP)"
  weights = config.get('pretrained', '') or 'tiny random models: images are noise-like'
  adapter = config.get('adapter', '') or ('written with the tiny release' if demo.release
                                          else 'none: UNTRAINED adapter')
  return (f'# RealCustom\n{kind} · weights: {weights} · adapter: {adapter}\n\n'
          'Upload a subject, type a prompt and pick its **target word** (the real word the '
          'subject narrows, e.g. "toy"): the influence scope of that word gates the '
          'subject. The strip shows the scope (grey) above the x0 prediction at a few '
          'steps; the plain text-to-image images start from the same noise.')


def build_ui(demo: Demo):
  """The Gradio Blocks page over `demo` (not launched).

  Args:
    demo: a (warmed) Demo.

  Returns:
    The gr.Blocks; its queue runs one generation at a time.
  """
  import gradio as gr  # pylint: disable=g-import-not-at-top
  defaults = demo.defaults()
  choices = word_choices(DEFAULT_PROMPT)
  with gr.Blocks(title='RealCustom demo', analytics_enabled=False,
                 theme=_theme()) as blocks:
    gr.Markdown(_title(demo))
    with gr.Row():
      with gr.Column(scale=1):
        subject = gr.Image(label='Subject image', type='filepath', image_mode=None,
                           sources=['upload', 'clipboard'], elem_id='subject', height=240)
        prompt = gr.Textbox(label='Prompt', value=DEFAULT_PROMPT, elem_id='prompt')
        word = gr.Dropdown(label='Target word', choices=choices,
                           value=pick_word(DEFAULT_PROMPT, DEFAULT_WORD, choices),
                           allow_custom_value=True, elem_id='word',
                           info='a word of the prompt; type a phrase ("teddy bear") if '
                                'it is not listed')
        with gr.Row():
          seed = gr.Number(label='Seed', value=0, precision=0, minimum=0,
                           maximum=2**32 - 1, elem_id='seed')
          num_images = gr.Slider(1, demo.max_images, value=1, step=1,
                                 label='Number of images', elem_id='num_images')
          num_steps = gr.Slider(1, demo.max_steps, value=demo.default_steps, step=1,
                                label='Steps', elem_id='num_steps')
        if demo.release:
          from realcustom_jax import mask_strategies  # pylint: disable=g-import-not-at-top
          modes = [m for m in mask_strategies.RELEASE_MASK_MODES
                   if m not in mask_strategies.INERT_MODES]
          guidance_scale = gr.Slider(0, 15, value=defaults['guidance_scale'], step=0.1,
                                     label='Guidance scale', elem_id='guidance_scale')
          mask_scope = gr.Slider(0, 1, value=defaults['mask_scope'], step=0.01,
                                 label='mask_scope (share of the image the subject may '
                                       'influence)', elem_id='mask_scope')
          mask_strategy = gr.CheckboxGroup(modes, value=defaults['mask_strategy'],
                                           label='Mask strategy', elem_id='mask_strategy')
          reuse = gr.Slider(0, demo.max_steps, value=defaults['mask_reused_step'], step=1,
                            label='mask_reused_step (steps from it on reuse the mask '
                                  'before it; 0: off)', elem_id='mask_reused_step')
          controls = [guidance_scale, mask_scope, mask_strategy, reuse]
          static_controls = [num_images, num_steps, mask_strategy, reuse]
        else:
          guidance_text = gr.Slider(0, 20, value=defaults['guidance_text'], step=0.1,
                                    label='w_t (text guidance, Eq. 13)', elem_id='w_t')
          guidance_image = gr.Slider(0, 30, value=defaults['guidance_image'], step=0.1,
                                     label='w_i (image guidance, Eq. 13)', elem_id='w_i')
          gamma_scope = gr.Slider(0, 1, value=defaults['gamma_scope'], step=0.01,
                                  label='gamma_scope (Eq. 11: share of the image in the '
                                        'scope)', elem_id='gamma_scope')
          gamma_num = gr.Slider(0, 1, value=defaults['gamma_num'], step=0.01,
                                label='gamma_num (Eq. 10: share of subject tokens kept)',
                                elem_id='gamma_num')
          scope = gr.Radio(['soft', 'binary'], value=defaults['scope'],
                           label='Influence scope', elem_id='scope')
          controls = [guidance_text, guidance_image, gamma_scope, gamma_num, scope]
          static_controls = [num_images, num_steps, scope]
        note = gr.Markdown(demo.compile_note(_ui_key(demo, demo.default_steps, 1,
                                                     defaults)), elem_id='compile_note')
        generate_button = gr.Button('Generate', variant='primary', elem_id='generate')
      with gr.Column(scale=2):
        with gr.Row():
          images = gr.Gallery(label='RealCustom', format='png', columns=2, height=300,
                              elem_id='images')
          plain = gr.Gallery(label='Plain text-to-image (same seed)', format='png',
                             columns=2, height=300, elem_id='plain')
        strip = gr.Image(label='Influence scope over the steps (scope above x0)',
                         type='pil', format='png', elem_id='strip')
        status = gr.Textbox(label='Status', interactive=False, lines=2, elem_id='status',
                            value=f'ready (start-up compile: {demo.compile_seconds:.1f} s)'
                            if demo.compile_seconds is not None else 'ready')

    def run(subject_, prompt_, word_, seed_, num_images_, num_steps_, values):
      """The generation, as a generator: a 'compiling' status first where it will."""
      try:
        request = demo.check_request(subject_, prompt_, word_, seed_, num_images_,
                                     num_steps_, values)
      except RequestError as e:
        raise gr.Error(str(e), print_exception=False) from None
      key = demo.static_key(request.num_steps, request.batch, request.settings)
      if key not in demo.compiled:
        yield (gr.skip(), gr.skip(), gr.skip(),
               f'compiling for {demo.describe(key)} (first use) ...')
      try:
        result = demo.generate(request)
      except ValueError as e:  # what the pipeline refuses, named
        raise gr.Error(_one_line(e), print_exception=False) from None
      except Exception as e:  # pylint: disable=broad-except
        # Logged with its traceback; the page gets one line and the worker lives on.
        logging.exception('generation failed')
        raise gr.Error(f'generation failed ({type(e).__name__}: {_one_line(e)}); see the '
                       'server log', print_exception=False) from None
      caption = lambda i: f'seed {request.seed}, image {i + 1}'
      yield ([(x, caption(i)) for i, x in enumerate(result.images)],
             [(x, caption(i)) for i, x in enumerate(result.plain)], result.strip,
             demo.status(result))

    # One signature per pipeline: the API's parameters are named after the controls.
    if demo.release:
      def generate(subject, prompt, word, seed, num_images, num_steps, guidance_scale,
                   mask_scope, mask_strategy, mask_reused_step):
        yield from run(subject, prompt, word, seed, num_images, num_steps, dict(
            guidance_scale=guidance_scale, mask_scope=mask_scope,
            mask_strategy=mask_strategy, mask_reused_step=mask_reused_step))
    else:
      def generate(subject, prompt, word, seed, num_images, num_steps, guidance_text,
                   guidance_image, gamma_scope, gamma_num, scope):
        yield from run(subject, prompt, word, seed, num_images, num_steps, dict(
            guidance_text=guidance_text, guidance_image=guidance_image,
            gamma_scope=gamma_scope, gamma_num=gamma_num, scope=scope))

    def update_words(prompt_, word_):
      options = word_choices(prompt_)
      return gr.Dropdown(choices=options, value=pick_word(prompt_, word_, options))

    def update_note(num_images_, num_steps_, *values):
      names = list(demo.defaults())
      try:
        key = _ui_key(demo, num_steps_, num_images_, dict(zip(names, values)))
      except (RequestError, ValueError, TypeError):
        key = None
      return demo.compile_note(key)

    # preprocess=False: the upload reaches `load_upload` as Gradio stored it (its path
    # checked to be an upload), so an unreadable or huge file is our one-line message
    # rather than a processing error raised inside Gradio.
    event = generate_button.click(
        generate, [subject, prompt, word, seed, num_images, num_steps] + controls,
        [images, plain, strip, status], api_name='generate', preprocess=False,
        concurrency_limit=1, concurrency_id='generate')
    event.then(update_note, [num_images, num_steps] + controls, note,
               api_name=False, queue=False)
    prompt.change(update_words, [prompt, word], word, api_name=False, queue=False,
                  show_progress='hidden')
    for control in static_controls:
      control.change(update_note, [num_images, num_steps] + controls, note,
                     api_name=False, queue=False, show_progress='hidden')
  blocks.queue(default_concurrency_limit=1)
  return blocks


def _ui_key(demo: Demo, num_steps, num_images, values: dict) -> StaticKey:
  settings = demo.settings(**values)
  return demo.static_key(_number('steps', num_steps, integer=True),
                         _number('number of images', num_images, integer=True), settings)


def _theme():
  """Gradio's default look with the system's fonts: its own fetch Google Fonts, which a
  closed network refuses (and a page then waits for)."""
  import gradio as gr  # pylint: disable=g-import-not-at-top
  return gr.themes.Default(font=['ui-sans-serif', 'system-ui', 'sans-serif'],
                           font_mono=['ui-monospace', 'Consolas', 'monospace'])


def launch(blocks, host: str = '127.0.0.1', port: int = 7860,
           max_file_size_mb: float = 20.0) -> str:
  """Starts serving `blocks` in the background (never a share tunnel); returns its URL."""
  blocks.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=True,
                quiet=True, show_error=False, max_file_size=int(max_file_size_mb * 2**20),
                ssr_mode=False, mcp_server=False, pwa=False)
  return f'http://{host}:{port}/'


# ---------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------


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
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
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
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  logging.info('loading models (%s)', config.get('pretrained', '') or (
      'tiny random release' if release_paths.is_release_config(config)
      else 'tiny embedded default'))
  pipe = pipelines.load_pipeline(config)
  loaded = time.perf_counter()
  logging.info('loaded in %.1f s', loaded - start)
  demo = Demo(pipe, _MAX_IMAGES.value, _MAX_STEPS.value)
  logging.info('compiling the samplers on one example (%s)', demo.describe(
      _ui_key(demo, demo.default_steps, 1, demo.defaults())))
  demo.warm_up()
  logging.info('warmed up in %.1f s (compile included)', demo.compile_seconds)
  blocks = build_ui(demo)
  url = launch(blocks, _HOST.value, _PORT.value, _MAX_FILE_MB.value)
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
          or (not _PRETRAINED.value and release_paths.tiny_release_pending(config))):
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
    _fail(_one_line(e))
  except OSError as e:  # the port was taken meanwhile
    _fail(f'cannot start the server: {_one_line(e)}')
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
