"""tfds builder: LAION-style webdataset shards -> filtered, resized ArrayRecord.

img2dataset writes LAION as webdataset `.tar` shards; each sample is `KEY.jpg` (or
`.png` / `.webp`), `KEY.txt` (the caption) and `KEY.json` (metadata, here carrying an
aesthetic score). This builder reads such shards from a local directory, keeps samples
whose score passes the threshold, resizes the shorter side to `resolution` and
center-crops (512 px in configs/laion.py, as IP-Adapter trains; the paper does not say),
and writes image + caption as ArrayRecord, which grain reads by random access. It runs
without TensorFlow.

Usage (what training calls):

  builder = prepare_dataset('/data/laion_shards', '/data/tfds', resolution=512)
  source = builder.as_data_source(split='train')
  print(read_prepare_stats(builder))  # {'written': ..., 'corrupt_image': ..., ...}
"""
from collections.abc import Iterator
import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import tarfile
from typing import Any

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

from realcustom_jax.runtime import cli

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
STATS_FILE = 'prepare_stats.json'
# Outcome counters of a preparation; every sample lands in 'written' or one skip reason.
STAT_KEYS = ('shards', 'bad_shard', 'samples', 'written', 'corrupt_image',
             'missing_image', 'missing_caption', 'missing_score', 'low_aesthetic',
             'missing_reference')
# `KEY.ref.png` (...): a sample's subject reference, read with `with_reference`.
REFERENCE_PREFIX = 'ref.'
_JPEG_QUALITY = 95  # re-encoding of the cropped image; 95 keeps artefacts negligible


@dataclasses.dataclass(eq=False)
class LaionConfig(tfds.core.BuilderConfig):
  """Where the shards are and how samples are filtered and cropped.

  Attributes:
    shards_dir: local directory holding the webdataset `.tar` shards.
    resolution: side of the square output images, in pixels.
    aesthetic_field: key of the score in each sample's `.json`.
    min_aesthetic: keep samples with score >= this; <= 0 turns filtering off.
    with_reference: also store each sample's subject reference, `KEY.ref.<ext>`
      (an image of the same subject in another scene), as the 'reference' feature;
      samples without one are skipped ('missing_reference').
  """
  shards_dir: str = ''
  resolution: int = 512
  aesthetic_field: str = 'aesthetic'
  min_aesthetic: float = 5.0
  with_reference: bool = False


def make_config(
    shards_dir: str,
    resolution: int,
    aesthetic_field: str = 'aesthetic',
    min_aesthetic: float = 5.0,
    shards: list[str] | None = None,
    with_reference: bool = False,
) -> LaionConfig:
  """Returns a builder config whose name identifies the source and the filtering.

  The name carries a hash of the absolute shard path and the score field, so two shard
  sets prepared into the same tfds `data_dir` do not overwrite each other, and a hash
  of the shard set (names and sizes): shards added, removed or rewritten after a
  preparation make a new name, so they are prepared again instead of ignored.

  Args:
    shards_dir: directory (or URL) holding the `.tar` shards.
    resolution: output side in pixels.
    aesthetic_field: score key in the `.json` metadata.
    min_aesthetic: score threshold; <= 0 keeps everything.
    shards: the shard paths, from `list_shards(shards_dir)` (listed when None).
    with_reference: store the samples' `KEY.ref.<ext>` subject references too (a
      set of its own: the name ends in `_ref`).

  Returns:
    The `LaionConfig`.
  """
  shards_dir = os.fspath(cli.absolute_path(shards_dir))
  if shards is None:
    shards = list_shards(shards_dir)
  threshold = f'{float(min_aesthetic):g}'.replace('.', 'p').replace('-', 'm')
  return LaionConfig(
      name=f'{_name_prefix(shards_dir, resolution, aesthetic_field, threshold)}_'
           f'{shard_set_digest(shards)}' + ('_ref' if with_reference else ''),
      description=f'{shards_dir}, {aesthetic_field} >= {min_aesthetic}'
                  + (', with references' if with_reference else ''),
      shards_dir=shards_dir,
      resolution=int(resolution),
      aesthetic_field=aesthetic_field,
      min_aesthetic=float(min_aesthetic),
      with_reference=bool(with_reference),
  )


def _name_prefix(shards_dir: str, resolution: int, aesthetic_field: str,
                 threshold: str) -> str:
  """The part of a config name that stays when the shard set changes."""
  digest = hashlib.sha1(
      f'{shards_dir}|{aesthetic_field}'.encode('utf-8')).hexdigest()[:8]
  return f'res{resolution}_min{threshold}_{digest}'


def shard_set_digest(shards: list[str]) -> str:
  """A short hash of the shard names and sizes."""
  h = hashlib.sha1()
  for path in sorted(shards):
    h.update(f'{os.path.basename(path)}:{epath.Path(path).stat().length}\n'.encode())
  return h.hexdigest()[:8]


def list_shards(shards_dir: str | os.PathLike[str]) -> list[str]:
  """Returns the sorted `.tar` paths in `shards_dir`.

  Args:
    shards_dir: directory (or URL, e.g. `gs://bucket/shards`) to list.

  Returns:
    Sorted absolute paths (or URLs) of the `.tar` files.

  Raises:
    ValueError: the directory does not exist or holds no `.tar` file.
  """
  shards_dir = os.fspath(shards_dir)
  root = cli.absolute_path(shards_dir)
  if not root.is_dir():
    raise ValueError(f'shards directory does not exist: {shards_dir!r}')
  paths = sorted(os.fspath(p) for p in root.iterdir() if p.name.endswith('.tar'))
  if not paths:
    raise ValueError(f'no .tar shards in {shards_dir!r}')
  return paths


def _read_score(meta_bytes: bytes | None, field: str) -> float | None:
  """Returns the finite numeric score under `field`, or None if absent/unreadable."""
  if meta_bytes is None:
    return None
  try:
    meta = json.loads(meta_bytes)
  except (ValueError, UnicodeDecodeError):
    return None
  value = meta.get(field) if isinstance(meta, dict) else None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def _read_caption(members: dict[str, bytes]) -> str:
  """Caption from `.txt`, else the `caption` field img2dataset also puts in `.json`."""
  if 'txt' in members:
    return members['txt'].decode('utf-8', errors='replace').strip()
  try:
    meta = json.loads(members.get('json', b'{}'))
  except (ValueError, UnicodeDecodeError):
    return ''
  caption = meta.get('caption') if isinstance(meta, dict) else None
  return caption.strip() if isinstance(caption, str) else ''


def resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
  """Resizes the shorter side to `resolution` (bicubic) and center-crops a square.

  Args:
    image: any PIL image.
    resolution: output side in pixels.

  Returns:
    An RGB `resolution` x `resolution` image.
  """
  return ImageOps.fit(
      image.convert('RGB'), (resolution, resolution),
      method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def center_crop_top_left(height: int, width: int, resolution: int) -> tuple[int, int]:
  """(top, left) of `resize_center_crop`'s square in the image resized so that its
  shorter side is `resolution`: SDXL's crop micro-conditioning (c_top, c_left)."""
  scale = resolution / min(height, width)
  resized_h, resized_w = round(height * scale), round(width * scale)
  return (max(resized_h - resolution, 0) // 2, max(resized_w - resolution, 0) // 2)


def _original_size(meta_bytes: bytes | None, image: Image.Image) -> tuple[int, int]:
  """(height, width) of the image before any resize: img2dataset's 'original_height' /
  'original_width' (it records them when it resizes), else the decoded image's."""
  try:
    meta = json.loads(meta_bytes) if meta_bytes else {}
  except (ValueError, UnicodeDecodeError):
    meta = {}
  h, w = (meta.get(k) if isinstance(meta, dict) else None
          for k in ('original_height', 'original_width'))
  if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (h, w)):
    return h, w
  return image.height, image.width


def process_sample(
    members: dict[str, bytes],
    resolution: int,
    aesthetic_field: str,
    min_aesthetic: float,
    with_reference: bool = False,
) -> tuple[dict[str, Any] | None, str]:
  """Turns one webdataset sample into a tfds example, or says why it was skipped.

  Missing `.txt`: the caption falls back to the `.json` `caption` field; with neither the
  sample is skipped ('missing_caption'). Missing `.json` (or no numeric score in it):
  the score is missing, and the sample is skipped ('missing_score') when
  `min_aesthetic > 0`, kept (score NaN) when filtering is off.

  Args:
    members: extension -> raw bytes of the sample's files.
    resolution: output side in pixels.
    aesthetic_field: score key in the `.json`.
    min_aesthetic: keep scores >= this; <= 0 keeps everything.
    with_reference: also read `KEY.ref.<ext>`, the subject reference ('reference').

  Returns:
    (example, 'written') or (None, reason), reason one of 'missing_image',
    'missing_caption', 'missing_score', 'low_aesthetic', 'corrupt_image',
    'missing_reference'.
  """
  image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
  if image_ext is None:
    return None, 'missing_image'
  # Cheap checks first: most LAION samples fail the score filter, decoding is costly.
  score = _read_score(members.get('json'), aesthetic_field)
  if min_aesthetic > 0:
    if score is None:
      return None, 'missing_score'
    if score < min_aesthetic:
      return None, 'low_aesthetic'
  caption = _read_caption(members)
  if not caption:
    return None, 'missing_caption'
  reference = None
  if with_reference:
    reference_ext = next((e for e in IMAGE_EXTENSIONS if REFERENCE_PREFIX + e in members),
                         None)
    if reference_ext is None:
      return None, 'missing_reference'
    reference = _square_image(members[REFERENCE_PREFIX + reference_ext], resolution)
    if reference is None:
      return None, 'corrupt_image'
  square = _square_image(members[image_ext], resolution, members.get('json'))
  if square is None:
    return None, 'corrupt_image'
  image_bytes, original_size, crop_top_left = square
  example = {
      'image': image_bytes,
      'caption': caption,
      'aesthetic': np.float32(np.nan if score is None else score),
      # SDXL's size and crop micro-conditions (the release trainer's time_ids).
      'original_size': np.asarray(original_size, np.int32),
      'crop_top_left': np.asarray(crop_top_left, np.int32),
  }
  if reference is not None:
    example['reference'] = reference[0]
  return example, 'written'


def _square_image(data: bytes, resolution: int, meta_bytes: bytes | None = None
                  ) -> tuple[bytes, tuple[int, int], tuple[int, int]] | None:
  """Decodes, resizes and centre-crops one image, re-encoded as JPEG.

  Returns:
    (JPEG bytes, original (height, width), crop (top, left)), or None when the bytes do
    not decode.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      source_is_jpeg = image.format == 'JPEG'
      # Before `draft`, which decodes JPEGs at a reduced size.
      original_size = _original_size(meta_bytes, image)
      crop_top_left = center_crop_top_left(image.height, image.width, resolution)
      # JPEG decodes at a reduced DCT scale that still covers `resolution`: much faster
      # for large LAION images, no effect on small ones.
      image.draft('RGB', (resolution, resolution))
      cropped = resize_center_crop(image, resolution)
  except Exception:  # pylint: disable=broad-except
    # PIL raises OSError, ValueError, SyntaxError, struct.error, DecompressionBombError
    # ... on malformed bytes; any of them means this one sample is unusable.
    return None
  buf = io.BytesIO()
  # A lossless source (PNG: the toy worlds' exact palette colours) keeps full chroma:
  # JPEG's default 4:2:0 subsampling moved 3.1% of a 16 px toy image's pixels to another
  # palette colour; 4:4:4 at this quality moves none. JPEG sources keep the default.
  chroma = {} if source_is_jpeg else {'subsampling': 0}
  cropped.save(buf, format='JPEG', quality=_JPEG_QUALITY, **chroma)
  return buf.getvalue(), original_size, crop_top_left


def iter_shard(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
  """Yields (key, {ext: bytes}) per sample of a webdataset tar, streaming.

  Webdataset groups consecutive members by the basename up to its first dot. A
  truncated or unreadable tar raises `tarfile.TarError` (or `OSError`) after yielding
  the samples read so far.

  Args:
    path: the `.tar` file.

  Yields:
    (key, members) pairs in file order.
  """
  key, members = None, {}
  # Through epath, so that shards on gs:// stream like local ones.
  with epath.Path(path).open('rb') as f, tarfile.open(fileobj=f, mode='r|*') as tar:
    for info in tar:
      if not info.isfile():
        continue
      dirname, basename = os.path.split(info.name)
      if '.' not in basename:
        continue
      stem, ext = basename.split('.', 1)
      member_key = os.path.join(dirname, stem)
      if member_key != key:
        if key is not None:
          yield key, members
        key, members = member_key, {}
      members[ext.lower()] = tar.extractfile(info).read()
  if key is not None:
    yield key, members


class LaionAesthetic(tfds.core.GeneratorBasedBuilder):
  """LAION-style image-text shards, aesthetic-filtered, resized and center-cropped."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'original_size and crop_top_left (SDXL micro-conditions).'}

  def __init__(self, *, config: LaionConfig, **kwargs):
    super().__init__(config=config, **kwargs)
    self.prepare_stats: collections.Counter[str] = collections.Counter()

  def _info(self) -> tfds.core.DatasetInfo:
    res = self.builder_config.resolution
    image = lambda: tfds.features.Image(shape=(res, res, 3), dtype=np.uint8,
                                        encoding_format='jpeg')
    # The subject reference, only in sets prepared `with_reference`.
    reference = {'reference': image()} if self.builder_config.with_reference else {}
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': image(),
            **reference,
            'caption': tfds.features.Text(),
            'aesthetic': np.float32,  # NaN when the sample had no score
            # (height, width) before resizing; (top, left) of the crop in the image
            # resized to `resolution` on its shorter side.
            'original_size': tfds.features.Tensor(shape=(2,), dtype=np.int32),
            'crop_top_left': tfds.features.Tensor(shape=(2,), dtype=np.int32),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # shards are local; nothing is downloaded
    return {'train': self._generate_examples(
        list_shards(self.builder_config.shards_dir))}

  def _generate_examples(self, paths: list[str]):
    cfg = self.builder_config
    stats = self.prepare_stats
    for path in paths:
      stats['shards'] += 1
      shard = os.path.basename(path)
      try:
        for key, members in iter_shard(path):
          stats['samples'] += 1
          example, status = process_sample(
              members, cfg.resolution, cfg.aesthetic_field, cfg.min_aesthetic,
              cfg.with_reference)
          stats[status] += 1
          if example is not None:
            yield f'{shard}/{key}', example
      except (tarfile.TarError, OSError, EOFError) as e:
        # A truncated download keeps the samples before the damage.
        stats['bad_shard'] += 1
        logging.warning('Stopped reading damaged shard %s: %s', path, e)
    logging.info('Prepared %s: %s', cfg.shards_dir, dict(stats))


def prepare_dataset(
    shards_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    resolution: int,
    aesthetic_field: str = 'aesthetic',
    min_aesthetic: float = 5.0,
    with_reference: bool = False,
) -> LaionAesthetic:
  """Prepares the shards as ArrayRecord under `data_dir` (no-op if already there).

  Skip counts (corrupt images, low scores, ...) are logged and saved as
  `prepare_stats.json` in the dataset's directory; read them with
  `read_prepare_stats`.

  Args:
    shards_dir: directory (or URL) of webdataset `.tar` shards.
    data_dir: tfds data directory (or URL) to write to.
    resolution: output side in pixels.
    aesthetic_field: score key in each `.json`.
    min_aesthetic: keep samples with score >= this; <= 0 keeps all.
    with_reference: store each sample's `KEY.ref.<ext>` subject reference too.

  Returns:
    The prepared builder; `builder.as_data_source(split='train')` reads it.

  Raises:
    ValueError: bad shards directory, resolution, or no sample survived filtering.
  """
  if not isinstance(resolution, int) or resolution <= 0:
    raise ValueError(f'resolution must be a positive int, got {resolution!r}')
  shards_dir = os.fspath(shards_dir)
  shards = list_shards(shards_dir)  # fail early, with the path, before tfds makes dirs
  builder = LaionAesthetic(
      config=make_config(shards_dir, resolution, aesthetic_field, min_aesthetic, shards,
                         with_reference),
      data_dir=os.fspath(data_dir),
      file_format='array_record',
  )
  if builder.is_prepared():
    logging.info('dataset %s already prepared (%d shards)', builder.data_dir, len(shards))
    return builder
  _report_changed_shard_set(builder, len(shards))
  logging.info('preparing %d shards of %s into %s', len(shards), shards_dir,
               builder.data_dir)
  try:
    builder.download_and_prepare()
  except Exception as e:
    if builder.prepare_stats and not builder.prepare_stats['written']:
      raise ValueError(
          f'no sample of {shards_dir!r} survived filtering: '
          f'{dict(builder.prepare_stats)}') from e
    raise
  stats = {k: builder.prepare_stats[k] for k in STAT_KEYS}
  (epath.Path(builder.data_dir) / STATS_FILE).write_text(json.dumps(stats, indent=2))
  return builder


def earlier_preparations(builder: LaionAesthetic) -> list[epath.Path]:
  """Prepared versions of the same shard directory and filter with another shard set."""
  name = builder.builder_config.name
  prefix = name.rsplit('_', 1)[0] + '_'
  configs_dir = epath.Path(builder.data_dir).parent.parent
  if not configs_dir.is_dir():
    return []
  return sorted(p for p in configs_dir.iterdir()
                if p.name.startswith(prefix) and p.name != name)


def _report_changed_shard_set(builder: LaionAesthetic, num_shards: int) -> None:
  """Warns when the shard directory was prepared before with other shards."""
  for old in earlier_preparations(builder):
    stats = old / str(builder.version) / STATS_FILE
    before = json.loads(stats.read_text())['shards'] if stats.exists() else '?'
    logging.warning(
        'the shards of %s changed since they were prepared into %s (%s shards then, %d '
        'now): preparing them again; delete the old directory to reclaim its space',
        builder.builder_config.shards_dir, old, before, num_shards)


def read_prepare_stats(builder: LaionAesthetic) -> dict[str, int]:
  """Returns the skip counts saved when `builder`'s dataset was prepared.

  Args:
    builder: a prepared builder.

  Returns:
    Counts for each of `STAT_KEYS`.
  """
  return json.loads((epath.Path(builder.data_dir) / STATS_FILE).read_text())
