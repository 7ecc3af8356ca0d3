"""Data pipeline: toy shards -> tfds ArrayRecord builder -> grain loader."""
import io
import json
import os
import re
import tarfile

import chex
import grain
import ml_collections
import numpy as np
from PIL import Image
import pytest

from realcustom_jax.release import training as release_training
from train import input_pipeline
from train import laion_builder
from train import synthetic_data as toy_data

RES = 16
TOKENS = 8


def _tokenize(caption: str) -> np.ndarray:
  """Deterministic stand-in for the CLIP tokenizer: caption bytes, padded."""
  return np.frombuffer(caption.encode()[:TOKENS].ljust(TOKENS, b'\0'), np.uint8)


def _index_tokenize(caption: str) -> np.ndarray:
  """For the in-memory source, whose captions are the record index."""
  return np.array([int(caption), 0, 0], np.int32)


def _config(**data) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.resolution = RES
  config.data = ml_collections.ConfigDict(dict(
      toy=True, toy_num_images=40, shards_dir='', tfds_data_dir='',
      aesthetic_field='aesthetic', min_aesthetic=0.0, batch_size=4,
      shuffle_seed=7, worker_count=0))
  config.data.update(data)
  return config


def _jpeg(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format='JPEG', quality=95)
  return buf.getvalue()


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _is_red(image: np.ndarray) -> np.ndarray:
  return image[..., 0].astype(int) > image[..., 2].astype(int)


def _fraction_near(image: np.ndarray, color) -> float:
  """Fraction of pixels within a JPEG-noise tolerance of `color`."""
  return float((np.abs(image.astype(int) - color).sum(-1) < 60).mean())


def _meta(score=None, **extra) -> bytes:
  meta = dict(extra)
  if score is not None:
    meta['aesthetic'] = score
  return json.dumps(meta).encode()


@pytest.fixture(scope='module')
def toy_source(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('work')
  return input_pipeline.get_data_source(_config(), workdir)


def _memory_source(n):
  return [{'image': np.full((2, 2, 3), i, np.uint8), 'caption': str(i)}
          for i in range(n)]


def _ids(batch):
  return [int(i) for i in batch['input_ids'][:, 0]]


# ---- Toy shards ----


def test_toy_shards_are_webdataset_tars(tmp_path):
  paths = toy_data.write_toy_shards(tmp_path / 'a', 10, 4, 24, seed=3)
  assert [os.path.basename(p) for p in paths] == [
      '00000.tar', '00001.tar', '00002.tar']
  colors = '|'.join(toy_data.COLORS)
  pattern = re.compile(rf'^an? ({colors}) (\w+) on an? ({colors}) background$')
  num_samples = 0
  for path in paths:
    with tarfile.open(path) as tar:
      names = tar.getnames()
      keys = sorted({n.split('.', 1)[0] for n in names})
      for key in keys:
        assert {f'{key}.jpg', f'{key}.txt', f'{key}.json'} <= set(names)
        image = np.asarray(Image.open(tar.extractfile(f'{key}.jpg')))
        caption = tar.extractfile(f'{key}.txt').read().decode()
        meta = json.load(tar.extractfile(f'{key}.json'))
        chex.assert_shape(image, (24, 24, 3))
        fg, shape, bg = pattern.match(caption).groups()
        assert shape in toy_data.SHAPES and fg != bg
        assert 5.0 <= meta['aesthetic'] < 8.0 and meta['caption'] == caption
        # The caption names what is drawn: background is the majority colour and
        # the shape's colour is present.
        bg_px = _fraction_near(image, toy_data.COLORS[bg])
        fg_px = _fraction_near(image, toy_data.COLORS[fg])
        assert bg_px > fg_px > 0.05, caption
        num_samples += 1
  assert num_samples == 10


def test_toy_shards_deterministic(tmp_path):
  a = toy_data.write_toy_shards(tmp_path / 'a', 6, 6, 16, seed=1)
  b = toy_data.write_toy_shards(tmp_path / 'b', 6, 6, 16, seed=1)
  c = toy_data.write_toy_shards(tmp_path / 'c', 6, 6, 16, seed=2)
  a, b, c = (open(p[0], 'rb').read() for p in (a, b, c))
  assert a == b and a != c


# ---- tfds builder ----


def test_prepare_toy_dataset(toy_source):
  assert len(toy_source) == 40
  example = toy_source[0]
  chex.assert_shape(example['image'], (RES, RES, 3))
  chex.assert_type(example['image'], np.uint8)
  assert b' on a' in example['caption']
  # The image carries the picture, not a constant: the toy shapes survive the resize.
  assert example['image'].std() > 10


def test_prepare_is_skipped_when_prepared(tmp_path):
  config = _config(toy_num_images=5)
  builder = input_pipeline.prepare_toy_dataset(tmp_path, config)
  record = next(p for p in os.listdir(builder.data_dir) if 'array_record' in p)
  mtime = os.path.getmtime(os.path.join(builder.data_dir, record))
  again = input_pipeline.prepare_toy_dataset(tmp_path, config)
  assert again.data_dir == builder.data_dir
  assert os.path.getmtime(os.path.join(builder.data_dir, record)) == mtime
  assert laion_builder.read_prepare_stats(again)['written'] == 5


def test_aesthetic_filter_drops_low_scores(tmp_path):
  shards = tmp_path / 'shards'
  toy_data.write_toy_shards(shards, 7, 4, 20, seed=0, aesthetic_range=(6, 8),
                            prefix='hi_')
  toy_data.write_toy_shards(shards, 5, 4, 20, seed=1, aesthetic_range=(1, 3),
                            prefix='lo_')
  kept = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES,
                                       min_aesthetic=5.0)
  source = kept.as_data_source(split='train')
  assert len(source) == 7
  assert all(source[i]['aesthetic'] >= 5.0 for i in range(7))
  stats = laion_builder.read_prepare_stats(kept)
  assert stats['low_aesthetic'] == 5 and stats['written'] == 7
  everything = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES,
                                             min_aesthetic=0)
  assert everything.info.splits['train'].num_examples == 12


def test_custom_score_field(tmp_path):
  shards = tmp_path / 'shards'
  toy_data.write_toy_shards(shards, 4, 4, 20, seed=0, aesthetic_field='score')
  # The default field is absent from these json files: every score is missing.
  with pytest.raises(ValueError, match='survived filtering'):
    laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES, min_aesthetic=1)
  builder = laion_builder.prepare_dataset(
      shards, tmp_path / 'tfds', RES, aesthetic_field='score', min_aesthetic=1)
  assert builder.info.splits['train'].num_examples == 4


def test_bad_samples_are_skipped_and_counted(tmp_path):
  shards = tmp_path / 'shards'
  shards.mkdir()
  good = _jpeg(Image.new('RGB', (20, 20), (200, 10, 10)))
  samples = [
      ('good', {'jpg': good, 'txt': b'a red image', 'json': _meta(6.0)}),
      ('corrupt', {'jpg': b'\xff\xd8 not a jpeg at all', 'txt': b'x',
                   'json': _meta(6.0)}),
      ('truncated', {'jpg': good[:len(good) // 2], 'txt': b'x',
                     'json': _meta(6.0)}),
      ('nojson', {'jpg': good, 'txt': b'no score'}),
      ('badscore', {'jpg': good, 'txt': b'x', 'json': _meta('high')}),
      ('jsoncaption', {'jpg': good, 'json': _meta(7.0, caption='from json')}),
      ('nocaption', {'jpg': good, 'json': _meta(7.0)}),
      ('noimage', {'txt': b'x', 'json': _meta(7.0)}),
  ]
  toy_data.write_webdataset_shard(shards / '00000.tar', samples)
  # A download cut short: the tar ends inside the second sample's image.
  toy_data.write_webdataset_shard(shards / '00001.tar', [
      ('cut0', {'jpg': good, 'txt': b'before the cut', 'json': _meta(6.0)}),
      ('cut1', {'jpg': good * 20, 'txt': b'x', 'json': _meta(6.0)}),
  ])
  data = (shards / '00001.tar').read_bytes()
  (shards / '00001.tar').write_bytes(data[:len(data) - 4000])

  builder = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES,
                                          min_aesthetic=5.0)
  stats = laion_builder.read_prepare_stats(builder)
  assert stats == {
      'shards': 2, 'bad_shard': 1, 'samples': 9, 'written': 3,
      'corrupt_image': 2, 'missing_image': 1, 'missing_caption': 1,
      'missing_score': 2, 'low_aesthetic': 0, 'missing_reference': 0}
  source = builder.as_data_source(split='train')
  captions = sorted(source[i]['caption'] for i in range(len(source)))
  assert captions == [b'a red image', b'before the cut', b'from json']


def test_missing_json_kept_when_filtering_off(tmp_path):
  shards = tmp_path / 'shards'
  shards.mkdir()
  good = _jpeg(Image.new('RGB', (20, 20), (10, 10, 200)))
  toy_data.write_webdataset_shard(shards / 'a.tar', [
      ('nojson', {'jpg': good, 'txt': b'no score'})])
  builder = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES,
                                          min_aesthetic=0)
  example = builder.as_data_source(split='train')[0]
  assert example['caption'] == b'no score' and np.isnan(example['aesthetic'])


def test_resize_and_center_crop(tmp_path):
  red, blue = (230, 0, 0), (0, 0, 230)
  # Wide, 64x32: red for x < 24. A center crop keeps x in [16, 48), so red is the
  # first quarter of the output (4 of 16 px); squashing would give 6 px, a left crop 12.
  wide = np.zeros((32, 64, 3), np.uint8)
  wide[:, :24], wide[:, 24:] = red, blue
  # Tall, 30x62 (odd sizes): top half red, so the split stays in the middle.
  tall = np.zeros((62, 30, 3), np.uint8)
  tall[:31], tall[31:] = red, blue
  shards = tmp_path / 'shards'
  shards.mkdir()
  toy_data.write_webdataset_shard(shards / 'a.tar', [
      ('wide', {'png': _png(wide), 'txt': b'wide', 'json': _meta(6.0)}),
      ('tall', {'png': _png(tall), 'txt': b'tall', 'json': _meta(6.0)}),
  ])
  builder = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES,
                                          min_aesthetic=5.0)
  source = builder.as_data_source(split='train')
  images = {source[i]['caption']: source[i]['image'] for i in range(2)}
  chex.assert_shape(images[b'wide'], (RES, RES, 3))
  expected_wide = np.zeros((RES, RES), bool)
  expected_wide[:, :4] = True
  np.testing.assert_array_equal(_is_red(images[b'wide']), expected_wide)
  expected_tall = np.zeros((RES, RES), bool)
  expected_tall[:RES // 2] = True
  np.testing.assert_array_equal(_is_red(images[b'tall']), expected_tall)


@pytest.mark.parametrize('make', ['missing', 'empty'])
def test_bad_shards_dir_raises(tmp_path, make):
  shards = tmp_path / 'shards'
  if make == 'empty':
    shards.mkdir()
    (shards / 'readme.txt').write_text('no tars here')
  with pytest.raises(ValueError, match=re.escape(str(shards))):
    laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES)
  config = _config(toy=False, shards_dir=str(shards))
  with pytest.raises(ValueError, match=re.escape(str(shards))):
    input_pipeline.get_data_source(config, tmp_path)


# ---- grain loader ----


def _take(loader, n):
  it = iter(loader)
  return [next(it) for _ in range(n)]


def test_loader_batches(toy_source):
  batch = _take(input_pipeline.create_train_loader(
      _config(), toy_source, _tokenize, seed=0), 1)[0]
  chex.assert_shape(batch['image'], (4, RES, RES, 3))
  chex.assert_type(batch['image'], np.float32)
  chex.assert_shape(batch['input_ids'], (4, TOKENS))
  chex.assert_type(batch['input_ids'], np.int32)
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
  # The full range is used: uint8 0..255 maps onto [-1, 1], not [0, 1].
  assert batch['image'].min() < -0.5 and batch['image'].max() > 0.5
  # First token is the caption's first byte: 'a'.
  np.testing.assert_array_equal(batch['input_ids'][:, 0], ord('a'))


def test_loader_deterministic(toy_source):
  config = _config()
  a = _take(input_pipeline.create_train_loader(config, toy_source, _tokenize, 3), 3)
  b = _take(input_pipeline.create_train_loader(config, toy_source, _tokenize, 3), 3)
  c = _take(input_pipeline.create_train_loader(config, toy_source, _tokenize, 4), 3)
  chex.assert_trees_all_equal(a, b)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_loader_repeats_and_reshuffles_epochs():
  source = _memory_source(12)
  loader = input_pipeline.create_train_loader(
      _config(batch_size=4), source, _index_tokenize, seed=0)
  batches = _take(loader, 9)  # three epochs
  epochs = [sum((_ids(b) for b in batches[i:i + 3]), []) for i in (0, 3, 6)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert epochs[0] != list(range(12)) and epochs[0] != epochs[1]


def test_loader_checkpoint_restore(toy_source):
  config = _config()
  it = iter(input_pipeline.create_train_loader(config, toy_source, _tokenize, 5))
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it), next(it)]
  restored = iter(input_pipeline.create_train_loader(
      config, toy_source, _tokenize, 5))
  restored.set_state(state)
  chex.assert_trees_all_equal([next(restored), next(restored)], expected)


def test_loader_checkpoint_with_orbax(tmp_path):
  ocp = pytest.importorskip('orbax.checkpoint')
  config = _config()
  source = _memory_source(10)
  it = iter(input_pipeline.create_train_loader(config, source, _index_tokenize, 1))
  next(it)
  with ocp.CheckpointManager(tmp_path / 'ckpt', item_names=('data',)) as mngr:
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    expected = _ids(next(it))
    restored = iter(input_pipeline.create_train_loader(
        config, source, _index_tokenize, 1))
    mngr.restore(1, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(restored)))
  assert _ids(next(restored)) == expected


def test_loader_shards_by_process():
  source = _memory_source(21)
  seen = []
  for index in range(2):
    shard = grain.sharding.ShardOptions(index, 2, drop_remainder=True)
    loader = input_pipeline.create_train_loader(
        _config(batch_size=4), source, _index_tokenize, seed=0,
        shard_options=shard)
    batches = _take(loader, 5)  # one epoch of this process's 10 records
    assert all(b['input_ids'].shape[0] == 2 for b in batches)  # 4 // 2 processes
    seen.append({i for b in batches for i in _ids(b)})
  assert len(seen[0]) == len(seen[1]) == 10
  assert not seen[0] & seen[1]


def test_global_batch_not_divisible_raises():
  shard = grain.sharding.ShardOptions(0, 2)
  with pytest.raises(ValueError, match='global batch size 5'):
    input_pipeline.create_train_loader(
        _config(batch_size=5), _memory_source(8), _index_tokenize, seed=0,
        shard_options=shard)


# ---- shard-set identity and the prepare command ----


def test_shards_added_later_are_prepared(tmp_path):
  shards = tmp_path / 'shards'
  toy_data.write_toy_shards(shards, 4, 4, 20, seed=0, prefix='a_')
  first = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES, min_aesthetic=0)
  assert first.info.splits['train'].num_examples == 4
  toy_data.write_toy_shards(shards, 3, 4, 20, seed=1, prefix='b_')  # one more shard
  second = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES, min_aesthetic=0)
  assert second.data_dir != first.data_dir
  assert second.info.splits['train'].num_examples == 7
  # The earlier preparation of the same directory is found (and reported).
  assert [p.name for p in laion_builder.earlier_preparations(second)] == [
      first.builder_config.name]
  # Same shards again: the prepared set is reused, not rebuilt.
  again = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES, min_aesthetic=0)
  assert again.data_dir == second.data_dir


def test_toy_and_shards_dir_contradict(tmp_path):
  with pytest.raises(ValueError, match='config.data.toy is True'):
    input_pipeline.check_data_config(_config(toy=True, shards_dir=str(tmp_path)))


def test_prepare_command_prepares_once(tmp_path):
  from train import prepare  # pylint: disable=g-import-not-at-top
  config = _config(toy_num_images=6)
  path, stats = prepare.prepare(config, tmp_path / 'work')
  assert stats['written'] == 6
  assert path.startswith(str(tmp_path / 'work' / 'tfds'))
  # What training then opens is that set.
  source = input_pipeline.get_data_source(config, tmp_path / 'work')
  assert len(source) == 6
  assert prepare.prepare(config, tmp_path / 'work') == (path, stats)


def test_lossless_sources_keep_full_chroma_jpeg_sources_their_encoding():
  """A palette PNG (as the toy worlds write) keeps its exact colours through preparation (4:4:4 JPEG); a JPEG
  source is re-encoded as before (4:2:0)."""
  from PIL import JpegImagePlugin  # pylint: disable=g-import-not-at-top
  palette = np.array(list(toy_data.COLORS.values()), np.uint8)
  rows, cols = np.mgrid[:16, :16]
  # A two-tone disc on a background, 1-pixel colour edges: what chroma subsampling smears.
  image = palette[np.where((rows - 8) ** 2 + (cols - 7) ** 2 < 30, 1 + (rows > 8), 5)]
  snap = lambda x: np.argmin(((x[..., None, :].astype(int) - palette) ** 2).sum(-1), -1)

  def prepared(fmt):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    example, status = laion_builder.process_sample(
        {fmt.lower(): buf.getvalue(), 'txt': b'a circle'}, 16, 'aesthetic', 0.0)
    assert status == 'written'
    return Image.open(io.BytesIO(example['image']))

  from_png = prepared('PNG')
  assert JpegImagePlugin.get_sampling(from_png) == 0  # 4:4:4
  np.testing.assert_array_equal(snap(np.asarray(from_png.convert('RGB'))), snap(image))
  assert JpegImagePlugin.get_sampling(prepared('JPEG')) == 2  # 4:2:0, as before


def test_sdxl_micro_conditions_are_the_crop_taken(tmp_path):
  """The prepared set keeps each source's size before resizing (img2dataset's
  original_height / original_width when it resized, else the decoded image's) and the
  (top, left) of the centre crop in the image resized to RES on its shorter side;
  SDXLTrainPreprocess turns them into SDXL's time_ids with the target size."""
  wide = np.zeros((32, 64, 3), np.uint8)  # resized to 16 x 32: the crop starts at x = 8
  tall = np.zeros((62, 30, 3), np.uint8)  # resized to 33 x 16: the crop starts at y = 8
  resized_meta = json.dumps({'aesthetic': 6.0, 'original_height': 600,
                             'original_width': 1200}).encode()
  shards = tmp_path / 'shards'
  shards.mkdir()
  toy_data.write_webdataset_shard(shards / 'a.tar', [
      ('wide', {'png': _png(wide), 'txt': b'wide', 'json': resized_meta}),
      ('tall', {'png': _png(tall), 'txt': b'tall', 'json': _meta(6.0)}),
  ])
  source = laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES,
                                         min_aesthetic=0.0).as_data_source(split='train')
  rows = {source[i]['caption']: source[i] for i in range(2)}
  np.testing.assert_array_equal(rows[b'wide']['original_size'], [600, 1200])
  np.testing.assert_array_equal(rows[b'wide']['crop_top_left'], [0, 8])
  np.testing.assert_array_equal(rows[b'tall']['original_size'], [62, 30])
  np.testing.assert_array_equal(rows[b'tall']['crop_top_left'], [8, 0])
  out = release_training.SDXLTrainPreprocess(_tokenize, lambda c: _tokenize(c)[::-1], RES).map(
      rows[b'wide'])
  np.testing.assert_array_equal(out['time_ids'], [600, 1200, 0, 8, RES, RES])
  assert out['time_ids'].dtype == np.float32
  np.testing.assert_array_equal(out['input_ids_2'], out['input_ids'][::-1])
  assert out['image'].shape == (RES, RES, 3) and out['image'].min() >= -1.0


def test_stored_references_reach_the_batches(tmp_path):
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  shards = tmp_path / 'shards'
  toy_world.write_world_shards(shards, 12, RES, seed=2, images_per_shard=6,
                               with_reference=True)
  config = _config(toy=False, shards_dir=str(shards), subject_reference='stored',
                   tfds_data_dir=str(tmp_path / 'tfds'))
  source = input_pipeline.get_data_source(config, tmp_path)
  assert len(source) == 12 and 'reference' in source[0]
  loader = input_pipeline.create_train_loader(config, source, _tokenize)
  batch = next(iter(loader))
  chex.assert_shape([batch['image'], batch['reference']], (4, RES, RES, 3))
  assert batch['reference'].min() >= -1.0 and batch['reference'].max() <= 1.0
  # The reference is another scene of the subject, not the training image.
  assert np.mean(batch['reference'] != batch['image']) > 0.3
  # The same shards read as the paper's: no reference, a set of its own.
  plain = input_pipeline.get_data_source(_config(
      toy=False, shards_dir=str(shards), tfds_data_dir=str(tmp_path / 'tfds')), tmp_path)
  assert 'reference' not in plain[0]
  assert np.array_equal(plain[0]['image'], source[0]['image'])


def test_stored_references_need_shards_that_have_them(tmp_path):
  with pytest.raises(ValueError, match='subject_reference'):
    input_pipeline.check_data_config(_config(subject_reference='other'))
  with pytest.raises(ValueError, match='toy shapes have none'):
    input_pipeline.check_data_config(_config(subject_reference='stored'))
  shards = tmp_path / 'plain'
  toy_data.write_toy_shards(shards, 4, 2, RES, seed=0)
  with pytest.raises(ValueError, match='missing_reference'):
    laion_builder.prepare_dataset(shards, tmp_path / 'tfds', RES, min_aesthetic=0,
                                  with_reference=True)
