"""The toy world draws what its captions and identities say, and keeps the split."""
import io
import json
import tarfile

import numpy as np
from PIL import Image
import pytest

from toy import base as toy_base
from toy import world as toy_world


def _colors_at(image, mask):
  return {tuple(int(c) for c in px) for px in image[mask]}


def test_render_paints_identity_halves_on_the_background():
  scene = toy_world.Scene('circle', 'red', 'white', 'blue', (8.0, 8.0), 11.0)
  image, mask = toy_world.render(scene, 16)
  assert image.shape == (16, 16, 3) and image.dtype == np.uint8
  assert 0.2 < mask.mean() < 0.5  # a subject, and the background stays the majority
  assert _colors_at(image, ~mask) == {toy_world.PALETTE['blue']}
  rows = np.arange(16)[:, None] + 0.5
  upper = np.broadcast_to(rows < 8.0, mask.shape)
  assert _colors_at(image, mask & upper) == {toy_world.PALETTE['red']}
  assert _colors_at(image, mask & ~upper) == {toy_world.PALETTE['white']}
  assert scene.caption == 'a circle on a blue background'


@pytest.mark.parametrize('shape', toy_world.SHAPES)
def test_every_shape_draws_a_distinct_mask(shape):
  masks = {s: toy_world.shape_mask(s, (8.0, 8.0), 12.0, 16) for s in toy_world.SHAPES}
  assert masks[shape].sum() > 20
  assert all(not np.array_equal(masks[shape], m) for s, m in masks.items() if s != shape)


def test_held_out_identities_are_disjoint_from_training():
  assert len(toy_world.HELD_OUT) == toy_world.NUM_HELD_OUT
  assert not set(toy_world.HELD_OUT) & set(toy_world.TRAIN_IDENTITIES)
  assert len(toy_world.TRAIN_IDENTITIES) + len(toy_world.HELD_OUT) == 56


def test_shards_hold_train_identities_only_and_are_deterministic(tmp_path):
  paths = toy_world.write_world_shards(tmp_path / 'a', 40, 16, seed=3, images_per_shard=16)
  again = toy_world.write_world_shards(tmp_path / 'b', 40, 16, seed=3, images_per_shard=16)
  assert len(paths) == 3
  assert [open(p, 'rb').read() for p in paths] == [open(p, 'rb').read() for p in again]
  images, captions = toy_world.render_arrays(40, 16, seed=3)
  n = 0
  for path in paths:
    with tarfile.open(path) as tar:
      members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name, data in members.items():
      if not name.endswith('.json'):
        continue
      meta = json.loads(data)
      key = name[:-5]
      assert (meta['body'], meta['accent']) in toy_world.TRAIN_IDENTITIES
      assert meta['background'] not in (meta['body'], meta['accent'])
      caption = members[key + '.txt'].decode()
      # The caption names the shape and the background, never the identity.
      assert caption == toy_world.caption(meta['shape'], meta['background'])
      png = np.asarray(Image.open(io.BytesIO(members[key + '.png'])))
      # The arrays the base model trains on are the shards' images, in order.
      assert np.array_equal(png, images[n]) and captions[n] == caption
      n += 1
  assert n == 40


def test_eval_cases_ask_for_a_visible_change_of_background():
  cases = toy_world.eval_cases(16, prompts_per_subject=4)
  assert len(cases) == 4 * len(toy_world.HELD_OUT)
  assert {c.subject.identity for c in cases} == set(toy_world.HELD_OUT)
  for c in cases:
    assert c.background not in c.subject.identity + (c.subject.background,)
    assert c.word == c.subject.shape and c.word in c.prompt.split()
  with pytest.raises(ValueError, match='prompts_per_subject'):
    toy_world.eval_cases(16, prompts_per_subject=6)


def test_every_caption_word_is_one_token():
  tokenizer = toy_base.build_tokenizer()
  for word in toy_world.WORDS:
    assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
  ids = tokenizer('an orange background').input_ids
  assert len(ids) == 5  # start, three words, end


def test_shards_with_references_keep_the_scenes_and_rerender_the_subject(tmp_path):
  plain = toy_world.write_world_shards(tmp_path / 'a', 24, 16, seed=5, images_per_shard=8)
  with_ref = toy_world.write_world_shards(tmp_path / 'b', 24, 16, seed=5, images_per_shard=8,
                                          with_reference=True)
  n = 0
  for p, r in zip(plain, with_ref):
    with tarfile.open(p) as tar:
      a = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    with tarfile.open(r) as tar:
      b = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    for name in a:
      if name.endswith(('.png', '.txt')):
        assert a[name] == b[name]  # the training scenes do not change
    for name, data in b.items():
      if not name.endswith('.json'):
        continue
      meta, key = json.loads(data), name[:-5]
      ref = meta['reference']
      # The same subject (shape, identity) in another scene.
      assert (ref['shape'], ref['body'], ref['accent']) == (
          meta['shape'], meta['body'], meta['accent'])
      assert ref['background'] not in (meta['background'], meta['body'], meta['accent'])
      image = np.asarray(Image.open(io.BytesIO(b[key + '.ref.png'])))
      expected, _ = toy_world.render(toy_world.Scene(**{
          k: tuple(v) if isinstance(v, list) else v for k, v in ref.items()}), 16)
      assert np.array_equal(image, expected)
      n += 1
  assert n == 24
