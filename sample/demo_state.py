"""The web demo's state: one pipeline, its compiled samplers, one generation at a time.

What the page offers comes from the model family (`family.GuidanceControls`), so this
module never asks which family it serves.
"""
import dataclasses
import threading
import time
from typing import Any, NamedTuple, Optional

from absl import logging

from sample.demo_inputs import DEFAULT_PROMPT
from sample.demo_inputs import DEFAULT_WORD
from sample.demo_inputs import load_upload
from sample.demo_inputs import one_line
from sample.demo_inputs import request_number
from sample.demo_inputs import RequestError
from sample.demo_inputs import scope_strip
from sample.demo_inputs import strip_steps


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
    family: its model family (`family.Family`); `controls` its guidance controls.
    max_images, max_steps: the request limits.
    compiled: the StaticKeys run so far (their programs are compiled).
    compile_seconds: how long the warm-up took (compile included), once warmed.
  """

  def __init__(self, pipe, max_images: int = 4, max_steps: int = 0, family=None):
    """Wraps `pipe`.

    Args:
      pipe: a `family.Pipeline` (`pipelines.load_pipeline`).
      max_images: most images per request.
      max_steps: most steps per request; 0: 50, or the config's steps if more.
      family: its `family.Family`; None: the one its config names.
    """
    from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
    self.pipe = pipe
    self.family = family or pipelines.family_for(pipe.config)
    self.controls = self.family.controls
    self.max_images = int(max_images)
    self.default_steps = int(pipe.config.sampler.num_steps)
    self.max_steps = int(max_steps) or max(50, self.default_steps)
    self.compiled: set[StaticKey] = set()
    self.compile_seconds: Optional[float] = None
    self._lock = threading.Lock()  # one generation at a time, whoever calls

  # ---- Settings ----

  def defaults(self) -> dict[str, Any]:
    """The page's first values: the config's sampler settings, one per control."""
    return self.controls.defaults(self.pipe.config.sampler)

  def settings(self, **values):
    """Checked GuidanceSettings from the page's controls (`defaults()`'s keys).

    Raises:
      RequestError: a value that is not a number, or one the family refuses (a gamma
        outside [0, 1], an unknown or empty mask strategy).
    """
    checked = dict(values)
    for control in self.controls.controls:
      if control.kind == 'slider':
        checked[control.name] = request_number(control.short, values[control.name],
                                               integer=control.integer)
    try:
      return self.controls.settings(self.pipe.config.sampler, checked)
    except ValueError as e:  # the family's and GuidanceSettings' own checks
      raise RequestError(one_line(e)) from None

  @staticmethod
  def static_key(num_steps: int, batch: int, settings) -> StaticKey:
    return StaticKey(int(num_steps), int(batch), bool(settings.binary_mask),
                     settings.mask_strategy, settings.mask_reused_step is not None)

  def describe(self, key: StaticKey) -> str:
    """'3 steps x 1 image, soft scope' (what selects the compiled program)."""
    from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
    settings = sampler.GuidanceSettings(
        binary_mask=key.binary_mask, mask_strategy=key.mask_strategy,
        mask_reused_step=1 if key.reuse else None)
    return (f'{key.num_steps} steps x {key.batch} image{"s" if key.batch > 1 else ""}'
            f'{self.controls.describe(settings)}')

  def compile_note(self, key: Optional[StaticKey]) -> str:
    """The note next to the controls that change the compiled program."""
    static = f'Steps, number of images and {self.controls.static_words}'
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

  def ui_key(self, num_steps, num_images, values: dict) -> StaticKey:
    """The StaticKey of the page's current values (RequestError when one is bad)."""
    settings = self.settings(**values)
    return self.static_key(request_number('steps', num_steps, integer=True),
                           request_number('number of images', num_images, integer=True),
                           settings)

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
    try:  # as the pipeline will when encoding (whole words, or the release's str.find)
      self.pipe.check_word(prompt, word)
    except ValueError as e:
      raise RequestError(one_line(e)) from None
    seed = request_number('seed', seed, integer=True)
    if not 0 <= seed < 2**32:
      raise RequestError(f'seed must lie in [0, 2**32), got {seed}')
    batch = request_number('number of images', num_images, integer=True)
    if not 1 <= batch <= self.max_images:
      raise RequestError(f'number of images must lie in [1, {self.max_images}], got {batch}')
    steps = request_number('steps', num_steps, integer=True)
    if not 1 <= steps <= self.max_steps:  # each new count compiles: bounded by the server
      raise RequestError(f'steps must lie in [1, {self.max_steps}] (the --max_steps of this '
                         f'server), got {steps}')
    try:
      schedules.check_num_steps(steps)
    except ValueError as e:
      raise RequestError(one_line(e)) from None
    return Request(image, prompt, word, seed, batch, steps, self.settings(**controls))

  # ---- Generation ----

  def sampler_programs(self) -> int:
    """Compiled executables of the two jitted samplers (the no-retrace counter)."""
    from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
    model = self.pipe.model
    # pylint: disable=protected-access
    return (self.family.cached_sampler(model, True)._cache_size()
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
      out = self.family.sample(pipe.model, pipe.params, schedule, latents, conditions,
                               request.settings, return_trajectory=True)
      jax.block_until_ready(out.latents)
      sampled = time.perf_counter()
      # Plain classifier-free guidance from the same z_T: the paper's w_t, or the
      # release's single scale (with its negative prompt). Fresh settings with default
      # static fields, so that soft/binary or the mask strategy never recompile it.
      scale = self.controls.plain_scale(request.settings)
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
