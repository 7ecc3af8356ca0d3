"""Loading the user's subject image: refuse what cannot be read, convert the rest."""
import os

import numpy as np
from PIL import Image
from PIL import ImageOps


class ImageInputError(ValueError):
  """A subject image path that cannot be used."""


def _to_rgb(image: Image.Image) -> Image.Image:
  """Converts any PIL mode to RGB; transparency is composited on white."""
  if image.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
    # 16/32-bit greyscale: PIL's own convert('L') clips instead of scaling.
    pixels = np.asarray(image, np.float64)
    peak = 65535.0 if pixels.max() > 255 or image.mode.startswith('I;16') else 255.0
    image = Image.fromarray(np.clip(pixels / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
  elif image.mode == 'F':
    pixels = np.asarray(image, np.float64)
    image = Image.fromarray(np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8))
  has_alpha = image.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or (
      image.mode == 'P' and 'transparency' in image.info)
  if has_alpha:
    image = image.convert('RGBA')
    background = Image.new('RGBA', image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert('RGB')
  return image.convert('RGB')


def load_subject_image(path: str, max_side: int = 2048) -> Image.Image:
  """Reads a subject image as RGB, whatever its mode, orientation or size.

  Args:
    path: image file.
    max_side: larger images are downscaled (aspect kept) so their longer side fits.

  Returns:
    An RGB PIL image, EXIF orientation applied.

  Raises:
    ImageInputError: (a ValueError) for a missing, unreadable, non-image or corrupt file.
  """
  path = os.fspath(path)
  if max_side < 1:
    raise ValueError(f'max_side must be positive, got {max_side}')
  if not os.path.exists(path):
    raise ImageInputError(f'subject image {path} does not exist')
  if os.path.isdir(path):
    raise ImageInputError(f'subject image {path} is a directory, not an image file')
  if not os.access(path, os.R_OK):
    raise ImageInputError(f'subject image {path} is not readable (permission denied)')
  try:
    with Image.open(path) as image:
      image.load()  # decode now, so truncated files fail here and not later
      image = ImageOps.exif_transpose(image)
      image = _to_rgb(image)
  except PermissionError:
    raise ImageInputError(f'subject image {path} is not readable (permission denied)') from None
  except Image.UnidentifiedImageError:
    raise ImageInputError(f'subject image {path} is not an image file PIL can read') from None
  except Image.DecompressionBombError:
    raise ImageInputError(f'subject image {path} has too many pixels to decode safely '
                          "(PIL's decompression-bomb limit)") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise ImageInputError(f'subject image {path} is corrupt or truncated: {e}') from None
  if max(image.size) > max_side:
    w, h = image.size
    scale = max_side / max(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                         Image.Resampling.LANCZOS)
  return image
