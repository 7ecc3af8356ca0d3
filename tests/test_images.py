"""Subject images: every readable format comes back RGB and upright; bad files are named."""
import os

import numpy as np
from PIL import Image
import pytest
from realcustom_jax.loading import images


def test_rgba_composited_on_white(tmp_path):
  rgba = np.zeros((8, 6, 4), np.uint8)
  rgba[..., 0] = 200  # red, but fully transparent on the left half
  rgba[:, 3:, 3] = 255
  path = tmp_path / 'a.png'
  Image.fromarray(rgba, 'RGBA').save(path)
  out = images.load_subject_image(path)
  assert out.mode == 'RGB' and out.size == (6, 8)
  pixels = np.asarray(out)
  assert (pixels[:, :3] == 255).all()
  assert (pixels[:, 3:] == (200, 0, 0)).all()


@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'CMYK', 'I;16'])
def test_other_modes_become_rgb(tmp_path, mode):
  grey = np.full((5, 7), 128, np.uint8)
  if mode == 'I;16':
    image = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit greyscale
    assert image.mode == 'I;16'
  else:
    image = Image.fromarray(grey).convert(mode)
  path = tmp_path / ('a.tif' if mode == 'CMYK' else 'a.png')
  image.save(path)
  out = images.load_subject_image(path)
  assert out.mode == 'RGB' and out.size == (7, 5)
  # mid grey stays mid grey (16-bit is rescaled, not clipped to white)
  assert np.abs(np.asarray(out, np.int32) - 128).max() <= 2


def test_exif_rotation_applied(tmp_path):
  tall = Image.new('RGB', (20, 40), (10, 20, 30))
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees to display
  path = tmp_path / 'rot.jpg'
  tall.save(path, exif=exif)
  out = images.load_subject_image(path)
  assert out.size == (40, 20)


def test_huge_image_downscaled(tmp_path):
  path = tmp_path / 'wide.png'
  Image.new('RGB', (5000, 300), (0, 128, 0)).save(path)
  out = images.load_subject_image(path, max_side=2048)
  assert out.size == (2048, 123)  # 300 * 2048 / 5000 = 122.9, aspect kept


def test_missing_file(tmp_path):
  path = tmp_path / 'nope.png'
  with pytest.raises(images.ImageInputError, match=r'nope\.png does not exist'):
    images.load_subject_image(path)


def test_not_an_image(tmp_path):
  path = tmp_path / 'notes.png'
  path.write_text('hello, not a picture')
  with pytest.raises(ValueError, match=r'notes\.png is not an image file') as e:
    images.load_subject_image(path)
  assert '\n' not in str(e.value)


def test_corrupt_image(tmp_path):
  path = tmp_path / 'cut.png'
  Image.new('RGB', (64, 64), (1, 2, 3)).save(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(images.ImageInputError, match=r'cut\.png is corrupt or truncated'):
    images.load_subject_image(path)


@pytest.mark.skipif(os.geteuid() == 0, reason='root reads files regardless of mode bits')
def test_unreadable_file(tmp_path):
  path = tmp_path / 'locked.png'
  Image.new('RGB', (4, 4)).save(path)
  path.chmod(0)
  with pytest.raises(images.ImageInputError, match=r'locked\.png is not readable'):
    images.load_subject_image(path)


def test_directory_refused(tmp_path):
  with pytest.raises(images.ImageInputError, match='is a directory'):
    images.load_subject_image(tmp_path)
