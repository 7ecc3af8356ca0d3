"""What `sample.evaluate` writes and reads besides the images: the per-image scores CSV,
the per-subject summary table, the skip messages summed up, and the per-subject grid."""
import csv
import math
import os
import re
from typing import Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont
from PIL import ImageOps

from realcustom_jax.eval import dreambench

METRICS = ('clip_t', 'clip_i', 'dino_i')
CSV_FIELDS = ('subject', 'class', 'prompt', 'image_index', 'seed', 'path') + METRICS
# Grid cells: a 32 px tiny image is scaled up (nearest) to 128 px so it can be seen;
# SD's 512 px images are scaled down to 256 px to keep a 25-prompt grid small.
GRID_MIN_CELL, GRID_MAX_CELL = 128, 256
GRID_LABEL_HEIGHT = 20  # the prompt, written above its row
_ABSENT_SUBJECT = re.compile(r'^(.*): listed in (\S+) but no folder, skipped$')


def read_rows(path: str, skipped: list[str]) -> dict:
  """Previous rows keyed by (subject, prompt, image_index, seed); unreadable -> none."""
  if not os.path.isfile(path):
    return {}
  rows = {}
  try:
    with open(path, newline='', encoding='utf-8') as f:
      for r in csv.DictReader(f):
        key = (r['subject'], r['prompt'], int(r['image_index']), int(r['seed']))
        rows[key] = ({k: r[k] for k in CSV_FIELDS} | {m: float(r[m]) for m in METRICS}
                     | {'image_index': key[2], 'seed': key[3]})
  except (KeyError, ValueError, TypeError, csv.Error) as e:
    skipped.append(f'{path}: unreadable ({type(e).__name__}: {e}), starting it over')
    return {}
  return rows


def write_csv(path: str, fields: Sequence[str], rows: Sequence[dict]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=list(fields))
    w.writeheader()
    for r in rows:
      w.writerow({k: (f'{v:.6f}' if isinstance(v, float) else v) for k, v in r.items()})
  os.replace(tmp, path)  # an interrupted run never leaves a half-written CSV


def load_images(paths: Sequence[str], skipped: list[str]):
  """Loads images and their masks; unreadable ones are reported and left out."""
  images, masks = [], []
  for p in paths:
    try:
      im = dreambench.load_image(p)
      mp = dreambench.mask_path(p)
      mask = dreambench.load_mask(mp, im.size) if mp else None
    except dreambench.BenchError as e:
      skipped.append(f'{e}; skipped')
      continue
    images.append(im)
    masks.append(mask)
  return images, masks


def summarize(rows: Sequence[dict]) -> list[dict]:
  """Mean and std (ddof=0) of each metric, overall then per subject."""
  groups = {'ALL': list(rows)}
  for r in rows:
    groups.setdefault(r['subject'], []).append(r)
  out = []
  for name, rs in groups.items():
    line = {'group': name, 'n': len(rs)}
    for m in METRICS:
      v = np.asarray([r[m] for r in rs], np.float64)
      line[f'{m}_mean'] = float(v.mean()) if len(v) else math.nan
      line[f'{m}_std'] = float(v.std()) if len(v) else math.nan
    out.append(line)
  return out


def format_table(summary: Sequence[dict]) -> str:
  """The summary as a fixed-width text table."""
  width = max([len('group')] + [len(s['group']) for s in summary])
  head = f'{"group":<{width}} {"n":>5}' + ''.join(f' {m:>17}' for m in METRICS)
  lines = [head, '-' * len(head)]
  for s in summary:
    cells = ''.join(f' {s[f"{m}_mean"]:>8.4f} ± {s[f"{m}_std"]:<6.4f}' for m in METRICS)
    lines.append(f'{s["group"]:<{width}} {s["n"]:>5}{cells}')
  return '\n'.join(lines)


def format_skipped(skipped: Sequence[str], shown: int = 5) -> str:
  """One summary of the skip messages: absent subjects on one line, the rest each.

  A subset of DreamBench (a few subject folders) leaves most subjects of the prompts
  file without a folder: one line names them, instead of one line each.

  Args:
    skipped: the messages.
    shown: absent subjects named before "+N more".

  Returns:
    The summary, several lines, starting with the count.
  """
  absent, files, others = [], set(), []
  for message in skipped:
    match = _ABSENT_SUBJECT.match(message)
    if match:
      absent.append(os.path.basename(match.group(1)))
      files.add(match.group(2))
    else:
      others.append(message)
  lines = [f'Skipped {len(skipped)} item(s):']
  if absent:
    more = f', +{len(absent) - shown} more' if len(absent) > shown else ''
    lines.append(f'  {len(absent)} subject(s) listed in {", ".join(sorted(files))} have no '
                 f'folder: {", ".join(absent[:shown])}{more}')
  lines += [f'  {m}' for m in others]
  return '\n'.join(lines)


def fit(image: Image.Image, cell: int) -> Image.Image:
  """`image` scaled to fit a `cell` square: nearest when enlarging, so pixels stay sharp."""
  grow = max(image.size) < cell
  return ImageOps.contain(image.convert('RGB'), (cell, cell),
                          Image.Resampling.NEAREST if grow else Image.Resampling.LANCZOS)


def label(draw: ImageDraw.ImageDraw, text: str, xy: tuple[int, int], width: int,
           font) -> None:
  """Writes `text` at `xy`, cut with an ellipsis to fit `width` pixels."""
  if draw.textlength(text, font=font) > width:
    while text and draw.textlength(text + '...', font=font) > width:
      text = text[:-1]
    text += '...'
  draw.text(xy, text, fill=(0, 0, 0), font=font)


def grid(reference: Image.Image, rows: Sequence[Sequence[Image.Image]],
          prompts: Sequence[str]) -> Image.Image:
  """Per prompt, its text above a row: the reference image, then the generated ones."""
  side = max(im.width for r in rows for im in r)
  cell = min(GRID_MAX_CELL, max(GRID_MIN_CELL, side))
  ncol = 1 + max(len(r) for r in rows)
  row_h = GRID_LABEL_HEIGHT + cell
  grid = Image.new('RGB', (ncol * cell, len(rows) * row_h), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  font = ImageFont.load_default(size=GRID_LABEL_HEIGHT - 6)
  ref = fit(reference, cell)
  for i, (r, prompt) in enumerate(zip(rows, prompts)):
    top = i * row_h
    label(draw, prompt, (4, top + 3), ncol * cell - 8, font)
    grid.paste(ref, (0, top + GRID_LABEL_HEIGHT))
    for j, im in enumerate(r):
      grid.paste(fit(im, cell), ((j + 1) * cell, top + GRID_LABEL_HEIGHT))
  return grid


def write_grid(path: str, reference: Image.Image, grid_rows: Sequence[Sequence[str]],
               prompts: Sequence[str], k_images: int, skipped: list[str]) -> None:
  """One subject's grid (`grid`) from its images on disk, when every one reads."""
  images, _ = load_images([p for row in grid_rows for p in row], skipped)
  if len(images) == len(grid_rows) * k_images:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid(reference, [images[i:i + k_images] for i in range(0, len(images), k_images)],
         prompts).save(path)
