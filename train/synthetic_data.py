"""Procedural toy image-text shards in the LAION / img2dataset webdataset format.

Each shard is a `.tar` holding, per sample, `KEY.jpg` (the image), `KEY.txt` (the
caption) and `KEY.json` (metadata with an aesthetic score), exactly the layout that
img2dataset writes. The toy set lets the embedded default (`configs/tiny.py`) train end to
end with no download: coloured shapes on coloured backgrounds, with captions that name
them ("a red circle on a blue background").
"""
from collections.abc import Iterable
import io
import json
import os
import tarfile

import numpy as np
from PIL import Image
from PIL import ImageDraw

COLORS = {
    'red': (220, 30, 30),
    'green': (30, 170, 50),
    'blue': (30, 60, 220),
    'yellow': (240, 220, 40),
    'purple': (140, 40, 170),
    'orange': (250, 140, 20),
    'white': (245, 245, 245),
    'black': (15, 15, 15),
}
SHAPES = ('circle', 'square', 'triangle', 'diamond')


def write_webdataset_shard(
    path: str | os.PathLike[str],
    samples: Iterable[tuple[str, dict[str, bytes]]],
) -> str:
  """Writes one webdataset tar: every (key, {ext: bytes}) becomes `KEY.ext` members.

  Args:
    path: the `.tar` file to write.
    samples: (key, members) pairs; members maps an extension ('jpg', 'txt', 'json')
      to the raw file bytes. Members of one sample are written next to each other, as
      webdataset readers expect.

  Returns:
    The path written, as a string.
  """
  path = os.fspath(path)
  with tarfile.open(path, 'w') as tar:
    for key, members in samples:
      for ext, data in members.items():
        info = tarfile.TarInfo(f'{key}.{ext}')
        info.size = len(data)
        info.mtime = 0  # byte-identical shards for the same seed
        tar.addfile(info, io.BytesIO(data))
  return path


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _draw_sample(
    rng: np.random.Generator, image_size: int
) -> tuple[Image.Image, str]:
  """Draws one random shape and returns the image and its caption."""
  names = list(COLORS)
  bg, fg = rng.choice(len(names), size=2, replace=False)
  shape = SHAPES[rng.integers(len(SHAPES))]
  image = Image.new('RGB', (image_size, image_size), COLORS[names[bg]])
  draw = ImageDraw.Draw(image)
  # Big enough to survive a resize to a few pixels, small enough that the background
  # stays the majority colour (even a square covers under half the image).
  size = rng.uniform(0.35, 0.65) * image_size
  cx, cy = rng.uniform(size / 2, image_size - size / 2, size=2)
  r = size / 2
  box = (cx - r, cy - r, cx + r, cy + r)
  color = COLORS[names[fg]]
  if shape == 'circle':
    draw.ellipse(box, fill=color)
  elif shape == 'square':
    draw.rectangle(box, fill=color)
  elif shape == 'triangle':
    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
  else:
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)],
                 fill=color)
  caption = (f'{_article(names[fg])} {names[fg]} {shape} on '
             f'{_article(names[bg])} {names[bg]} background')
  return image, caption


def write_toy_shards(
    out_dir: str | os.PathLike[str],
    num_images: int,
    images_per_shard: int,
    image_size: int,
    seed: int,
    *,
    aesthetic_range: tuple[float, float] = (5.0, 8.0),
    aesthetic_field: str = 'aesthetic',
    prefix: str = '',
) -> list[str]:
  """Writes `num_images` captioned toy images as img2dataset-style webdataset shards.

  Deterministic: the same arguments give byte-identical shards.

  Args:
    out_dir: directory for the shards (created if missing).
    num_images: total number of samples.
    images_per_shard: samples per `.tar`; the last shard may hold fewer.
    image_size: side of the square images, in pixels.
    seed: seed of the numpy generator that picks shapes, colours, places and scores.
    aesthetic_range: scores are drawn uniformly from [low, high).
    aesthetic_field: name of the score field in each `.json`.
    prefix: prepended to the shard file names, so several sets can share a directory.

  Returns:
    The shard paths, in order.
  """
  if num_images <= 0:
    raise ValueError(f'num_images must be positive, got {num_images}')
  if images_per_shard <= 0:
    raise ValueError(f'images_per_shard must be positive, got {images_per_shard}')
  if image_size < 4:
    raise ValueError(f'image_size must be at least 4 pixels, got {image_size}')
  os.makedirs(out_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  paths = []
  for shard, start in enumerate(range(0, num_images, images_per_shard)):
    samples = []
    for i in range(start, min(start + images_per_shard, num_images)):
      image, caption = _draw_sample(rng, image_size)
      buf = io.BytesIO()
      image.save(buf, format='JPEG', quality=95)
      # img2dataset keys: 5-digit shard id then 4-digit index within the shard.
      key = f'{shard:05d}{i - start:04d}'
      meta = {
          'key': key,
          'caption': caption,
          'width': image_size,
          'height': image_size,
          aesthetic_field: float(rng.uniform(*aesthetic_range)),
      }
      samples.append((key, {
          'jpg': buf.getvalue(),
          'txt': caption.encode('utf-8'),
          'json': json.dumps(meta).encode('utf-8'),
      }))
    path = os.path.join(out_dir, f'{prefix}{shard:05d}.tar')
    paths.append(write_webdataset_shard(path, samples))
  return paths

