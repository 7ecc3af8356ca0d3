"""Metrics of the toy world (toy/world.py) that need no pretrained network.

Every pixel is snapped to the nearest palette colour. Then, per generated image:

- text control (`text`): the image's most frequent colour is the background the prompt
  asked for (1 or 0). The subject covers under half of a world image, so a generated
  image that follows "... on a blue background" is mostly blue. `bg_frac` is the share
  of pixels of the asked colour (a softer reading of the same).
- subject similarity (`sim`): the subject is segmented as the pixels that are not the
  image's own dominant (background) colour, whatever that colour is (the paper
  segments with SAM before CLIP-I / DINO-I, independently of the background). `sim` is
  the histogram intersection of the palette colours of that region with those of the
  reference subject's region (1: the same colours in the same proportions). `id` is
  the crisper version: the region's two most frequent colours are the subject's body and
  accent colours (1 or 0).
- `scope_in_object`: share of the final influence scope's mass that falls on the
  segmented subject (how well the word's attention finds the object).
"""
import numpy as np

from toy import world as toy_world

_PALETTE = np.asarray([toy_world.PALETTE[c] for c in toy_world.COLORS], np.float32)


def quantize(images: np.ndarray) -> np.ndarray:
  """(..., H, W, 3) uint8 -> (..., H, W) palette indices (nearest colour in RGB)."""
  x = np.asarray(images, np.float32)[..., None, :]
  return np.argmin(np.sum(np.square(x - _PALETTE), axis=-1), axis=-1)


def color_index(name: str) -> int:
  return toy_world.COLORS.index(name)


def _histogram(indices: np.ndarray) -> np.ndarray:
  counts = np.bincount(indices.ravel(), minlength=len(_PALETTE)).astype(np.float64)
  return counts / max(counts.sum(), 1.0)


def foreground(indices: np.ndarray) -> np.ndarray:
  """(H, W) bool: pixels that are not the image's dominant colour."""
  dominant = np.bincount(indices.ravel(), minlength=len(_PALETTE)).argmax()
  return indices != dominant


def subject_histogram(image: np.ndarray) -> np.ndarray:
  """Palette histogram of a (H, W, 3) image's foreground (the subject)."""
  q = quantize(image)
  return _histogram(q[foreground(q)])


def score_image(image: np.ndarray, background: str, reference: np.ndarray,
                identity: tuple[str, str], scope: np.ndarray | None = None) -> dict:
  """Scores one generated image.

  Args:
    image: (H, W, 3) uint8 generated image.
    background: the background colour the prompt asked for.
    reference: (H, W, 3) uint8 reference image of the subject.
    identity: the subject's (body, accent) colours.
    scope: optional (h, w) final influence scope; resized to H x W by pixel repetition.

  Returns:
    {'text', 'bg_frac', 'sim', 'id'} (and 'scope_in_object' with a scope), floats.
  """
  q = quantize(image)
  counts = np.bincount(q.ravel(), minlength=len(_PALETTE))
  asked = color_index(background)
  fg = q != counts.argmax()
  hist = _histogram(q[fg])
  ref = subject_histogram(reference)
  top2 = set(np.argsort(-np.bincount(q[fg], minlength=len(_PALETTE)))[:2]) if fg.any() else set()
  out = dict(
      text=float(counts.argmax() == asked),
      bg_frac=float(counts[asked] / q.size),
      sim=float(np.minimum(hist, ref).sum()) if fg.any() else 0.0,
      id=float(top2 == {color_index(identity[0]), color_index(identity[1])}),
  )
  if scope is not None:
    scope = np.asarray(scope, np.float64)
    reps = (q.shape[0] // scope.shape[0], q.shape[1] // scope.shape[1])
    full = np.kron(scope, np.ones(reps))
    out['scope_in_object'] = float((full * fg).sum() / max(full.sum(), 1e-12))
  return out


def summarize(rows: list[dict]) -> dict:
  """Mean and standard error of every metric over a variant's samples."""
  if not rows:
    raise ValueError('no samples to summarize')
  out = {'n': len(rows)}
  for key in rows[0]:
    values = np.asarray([r[key] for r in rows], np.float64)
    out[key] = float(values.mean())
    out[key + '_se'] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
  return out


def summarize_over_seeds(rows_by_seed: dict) -> dict:
  """A variant's metrics over several training seeds.

  Each metric is the mean over seeds of the per-seed means; beside it `<key>_se`, the
  sampling standard error of that mean (the per-seed errors combined), `<key>_seed_sd`,
  the spread between the seeds' means (standard deviation, 0 with one seed), and
  `<key>_per_seed`. `training_seeds` lists the seeds; `n` counts the samples of one
  seed.

  Args:
    rows_by_seed: {training seed: that seed's per-sample rows (`score_image`)}; a
      variant without training (plain T2I) passes one entry.
  """
  if not rows_by_seed:
    raise ValueError('no training seed to summarize')
  seeds = sorted(rows_by_seed)
  per_seed = [summarize(rows_by_seed[s]) for s in seeds]
  out = {'n': per_seed[0]['n'], 'training_seeds': list(seeds)}
  for key in per_seed[0]:
    if key == 'n' or key.endswith('_se'):
      continue
    means = np.asarray([p[key] for p in per_seed], np.float64)
    errors = np.asarray([p[key + '_se'] for p in per_seed], np.float64)
    out[key] = float(means.mean())
    out[key + '_se'] = float(np.sqrt(np.sum(errors ** 2)) / len(seeds))
    out[key + '_seed_sd'] = float(means.std(ddof=1)) if len(seeds) > 1 else 0.0
    out[key + '_per_seed'] = [float(m) for m in means]
  return out


def difference_is_evidence(a: dict, b: dict, key: str = 'id') -> bool:
  """Whether a's `key` exceeds b's by more than twice their combined standard error.

  The error of each mean over training seeds counts both the sampling error and the
  spread between seeds (seed_sd / sqrt(seeds)), whichever is larger, so that one lucky
  seed is not evidence.
  """
  def error(r):
    seeds = max(len(r.get('training_seeds', [0])), 1)
    return max(r[key + '_se'], r.get(key + '_seed_sd', 0.0) / np.sqrt(seeds))
  return a[key] - b[key] > 2.0 * float(np.hypot(error(a), error(b)))
