"""The web demo's inputs and pictures, without JAX or Gradio: the target words offered
for a prompt, the checked upload, request numbers, and the Fig. 6-style scope strip."""
import os
import re
from typing import Any, Optional, Sequence
import warnings

# The example the samplers are warmed on, and the page's first values.
DEFAULT_PROMPT = 'a toy on the beach'
DEFAULT_WORD = 'toy'
# Uploads with more pixels are refused before decoding (load_subject_image then
# downscales what is left to 2048 px): 40 MP is an 8K photo and 120 MB decoded.
MAX_SUBJECT_PIXELS = 40_000_000
# Columns of the scope strip: this many steps evenly spaced, the last included (Fig. 6).
STRIP_COLUMNS = 5
STRIP_TILE = 96  # px: tiny 32 px outputs are upscaled, SDXL's 1024 px downscaled
STRIP_MARGIN = 52  # px: the row labels on the left
STRIP_HEADER = 18  # px: the step labels on top
# Not offered as target words (they can still be typed).
_STOP_WORDS = frozenset(
    'a an the of on in at to with and or by for from as is are was were be its it his her '
    'their this that these those into onto over under near next beside behind above below '
    'some very'.split())
_WORD = re.compile(r"[^\W_](?:[\w'-]*[^\W_])?")


class RequestError(ValueError):
  """A mistake in a request from the page (shown there as one line)."""


def one_line(error: BaseException) -> str:
  """An error's first line (its type's name when it has no message)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


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
    raise RequestError(one_line(e).replace(path, name)) from None


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
  tile_w = STRIP_TILE
  tile_h = max(1, round(STRIP_TILE * x0.shape[2] / x0.shape[3]))  # the images' aspect
  gap = 4
  band = 2 * tile_h + gap
  strip = Image.new('RGB', (STRIP_MARGIN + len(steps) * (tile_w + gap),
                            STRIP_HEADER + batch * band), (235, 235, 235))
  draw = ImageDraw.Draw(strip)
  font = ImageFont.load_default(size=12)
  for col, step in enumerate(steps):
    left = STRIP_MARGIN + col * (tile_w + gap)
    draw.text((left + 2, 2), f'step {step + 1}/{num_steps}', fill='black', font=font)
    for row in range(batch):
      top = STRIP_HEADER + row * band
      mask = np.round(np.clip(masks[col, row], 0.0, 1.0) * 255).astype(np.uint8)
      strip.paste(Image.fromarray(mask, 'L').resize((tile_w, tile_h),
                                                    Image.Resampling.NEAREST), (left, top))
      strip.paste(Image.fromarray(x0[col, row]).resize((tile_w, tile_h),
                                                       Image.Resampling.BILINEAR),
                  (left, top + tile_h))
  for row in range(batch):
    top = STRIP_HEADER + row * band
    prefix = f'#{row + 1} ' if batch > 1 else ''
    draw.text((4, top + tile_h // 2 - 6), prefix + 'scope', fill='black', font=font)
    draw.text((4, top + tile_h + tile_h // 2 - 6), prefix + 'x0', fill='black', font=font)
  return strip


def request_number(name: str, value, integer: bool = False):
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
