"""Reads a DreamBench-layout directory (google/dreambooth `dataset/`).

Layout: one folder per subject holding its real images, and `prompts_and_classes.txt`
at the root with the subject -> class table and the object / live-subject prompt lists,
written as Python format strings over `{0}` (unique token) and `{1}` (class word).

RealCustom is open-domain: there is no unique token, the class word itself is the real
word whose cross-attention picks the subject's scope. So `{0}` is dropped and `{1}` filled
with the class: 'a {0} {1} in the jungle' -> 'a backpack in the jungle', word 'backpack'.

A subject mask (e.g. from SAM) may sit beside an image as `NAME_mask.png`; mask files are
never listed as images.
"""
import dataclasses
import os
import re

import numpy as np
from PIL import Image
from PIL import ImageOps

from realcustom_jax.loading import images

PROMPTS_FILE = 'prompts_and_classes.txt'
IMAGE_EXTS = ('.jpg', '.jpeg', '.png')
MASK_SUFFIX = '_mask'
# DreamBench's live subjects are its animals; they get the live-subject prompt list.
LIVE_CLASSES = frozenset({'cat', 'dog'})


class BenchError(ValueError):
  """A user mistake in the benchmark directory (message names the file)."""


@dataclasses.dataclass(frozen=True)
class Subject:
  name: str
  class_word: str
  image_paths: tuple[str, ...]
  is_live: bool


@dataclasses.dataclass
class Bench:
  subjects: list[Subject]
  object_prompts: list[str]  # templates with {0}, {1}
  live_prompts: list[str]
  skipped: list[str]  # one message per subject left out, naming the path


def format_prompt(template: str, class_word: str) -> str:
  """Fills a DreamBench template for the open-domain setting.

  Args:
    template: e.g. 'a {0} {1} in the jungle'.
    class_word: the real word, e.g. 'backpack' or 'stuffed animal'.

  Returns:
    The prompt with `{0}` dropped and `{1}` replaced, whitespace collapsed.
  """
  text = template.replace('{0}', ' ').replace('{1}', class_word)
  return ' '.join(text.split())


_QUOTED = re.compile(r"""'((?:[^'\\\n]|\\.)*)'|"((?:[^"\\\n]|\\.)*)\"""")
_LIST = re.compile(r'\w*\s*=\s*\[(.*?)\]', re.DOTALL)
_CLASS_LINE = re.compile(r'^\s*([\w.\-]+)\s*,\s*([^,]+?)\s*$')


def parse_prompts_file(text: str, path: str = PROMPTS_FILE):
  """Parses DreamBench's `prompts_and_classes.txt` without executing it.

  A list whose preceding heading mentions 'live' is the live-subject list; the other is
  the object list. A missing live list falls back to the object list.

  Args:
    text: the file's contents.
    path: used in error messages only.

  Returns:
    (classes, object_prompts, live_prompts): `classes` maps subject name -> class word;
    the prompt lists hold templates with `{0}` / `{1}`.

  Raises:
    BenchError: no class table or no prompt list found.
  """
  lists = list(_LIST.finditer(text))
  head_end = lists[0].start() if lists else len(text)
  classes = {}
  for line in text[:head_end].splitlines():
    m = _CLASS_LINE.match(line)
    if m and m.group(1).lower() != 'subject_name':
      classes[m.group(1)] = m.group(2)
  object_prompts, live_prompts = None, None
  prev_end = 0
  for m in lists:
    heading = text[prev_end:m.start()]
    prev_end = m.end()
    prompts = [a if a is not None else b for a, b in _QUOTED.findall(m.group(1))]
    prompts = [p for p in prompts if '{1}' in p]
    if not prompts:
      continue
    if 'live' in heading.lower():
      live_prompts = live_prompts or prompts
    else:
      object_prompts = object_prompts or prompts
  if not classes:
    raise BenchError(f'{path}: no "subject_name,class" lines found')
  if object_prompts is None:
    raise BenchError(f"{path}: no prompt list (prompt_list = ['a {{0}} {{1}} ...', ...])")
  return classes, object_prompts, live_prompts or object_prompts


def is_mask_file(path: str) -> bool:
  return os.path.splitext(os.path.basename(path))[0].endswith(MASK_SUFFIX)


def mask_path(image_path: str) -> str | None:
  """Returns `NAME_mask.png` beside `NAME.ext` if that file exists, else None."""
  stem = os.path.splitext(image_path)[0]
  candidate = stem + MASK_SUFFIX + '.png'
  return candidate if os.path.isfile(candidate) else None


def list_images(folder: str) -> list[str]:
  """Sorted image files of `folder`, mask files left out."""
  names = sorted(os.listdir(folder))
  return [os.path.join(folder, n) for n in names
          if n.lower().endswith(IMAGE_EXTS) and not is_mask_file(n)
          and os.path.isfile(os.path.join(folder, n))]


def load_image(path: str) -> Image.Image:
  """Opens an image as RGB, upright (EXIF orientation applied), any PIL mode.

  Raises:
    BenchError: the file cannot be read as an image (the message names it).
  """
  try:
    return images.load_subject_image(path)
  except images.ImageInputError as e:
    raise BenchError(str(e)) from None


def load_mask(path: str, size: tuple[int, int]):
  """Opens a mask as floats in [0, 1], resized to `size` = (width, height).

  Raises:
    BenchError: the file cannot be read as an image.
  """
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im).convert('L')
      if im.size != size:
        im = im.resize(size, Image.Resampling.BILINEAR)
      return np.asarray(im, np.float32) / 255.0
  except Exception as e:  # pylint: disable=broad-except
    raise BenchError(f'{path}: cannot read mask ({type(e).__name__}: {e})') from None


def load_bench(bench_dir: str) -> Bench:
  """Lists the subjects and prompt templates of a DreamBench-layout directory.

  Subjects without a class line, or without any image file, are left out and reported
  in `Bench.skipped`; image readability is checked later, when images are loaded.

  Args:
    bench_dir: the directory holding `prompts_and_classes.txt` and subject folders.

  Returns:
    A `Bench` with subjects sorted by name.

  Raises:
    BenchError: `bench_dir` or its prompts file is missing or unusable.
  """
  if not os.path.isdir(bench_dir):
    raise BenchError(f'{bench_dir}: benchmark directory not found')
  prompts_file = os.path.join(bench_dir, PROMPTS_FILE)
  if not os.path.isfile(prompts_file):
    raise BenchError(f'{prompts_file}: prompts file not found')
  try:
    with open(prompts_file, encoding='utf-8') as f:
      text = f.read()
  except (OSError, UnicodeDecodeError) as e:
    raise BenchError(f'{prompts_file}: cannot read ({e})') from None
  classes, object_prompts, live_prompts = parse_prompts_file(text, prompts_file)

  subjects, skipped = [], []
  folders = sorted(n for n in os.listdir(bench_dir)
                   if os.path.isdir(os.path.join(bench_dir, n)) and not n.startswith('.'))
  for name in folders:
    folder = os.path.join(bench_dir, name)
    if name not in classes:
      skipped.append(f'{folder}: subject has no class line in {prompts_file}, skipped')
      continue
    paths = list_images(folder)
    if not paths:
      skipped.append(f'{folder}: no images (jpg/png), subject skipped')
      continue
    cls = classes[name]
    subjects.append(Subject(name, cls, tuple(paths), cls.lower() in LIVE_CLASSES))
  for name in sorted(set(classes) - set(folders)):
    skipped.append(f'{os.path.join(bench_dir, name)}: listed in {PROMPTS_FILE} but no '
                   'folder, skipped')
  return Bench(subjects, object_prompts, live_prompts, skipped)
