"""Gate A: does Eq. 10 keep the subject's tokens? (inference only, no retraining)

The toy world knows where the subject is in its reference image, so each subject token
(a patch of the reference) has a known share of object area. From it:

* `token_object_area`: each token's object share, in the vision tower's token order;
* `priority`: a fixed order of the tokens that Eq. 10's top-k can follow instead of the
  learned scores (`Conditions.token_priority`): the oracle (most object area first),
  the anti-oracle (least first) and a random order;
* `selection_stats`: from the tokens the sampler kept at every step
  (`SampleOutput.selections`), the *selection precision* (the share of object area
  among the kept tokens, averaged over steps and samples) beside the same share for a
  random choice of as many tokens and for the oracle's, and the share of the object's
  area each sample lost per step.
"""
import numpy as np

PRIORITIES = ('oracle', 'anti_oracle', 'random')


def token_object_area(masks: np.ndarray, num_tokens: int) -> np.ndarray:
  """(B, n) share of object pixels in each subject token, row-major patches.

  Args:
    masks: (B, S, S) bool object masks of the reference images, at the vision tower's
      input size (the toy world's images are that size already).
    num_tokens: n, a square number of patches (the tower's patch grid).
  """
  masks = np.asarray(masks, np.float64)
  b, s = masks.shape[:2]
  grid = int(round(np.sqrt(num_tokens)))
  if grid * grid != num_tokens or s % grid:
    raise ValueError(f'{num_tokens} tokens do not tile a {s} px image in square patches')
  p = s // grid
  return masks.reshape(b, grid, p, grid, p).mean(axis=(2, 4)).reshape(b, num_tokens)


def subject_tokens(vision, scenes, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The tokens the adapter reads for `scenes` (each rendered as a subject image) and
  their object shares: ((B, n, c) float64 features, (B, n) `token_object_area`).

  Args:
    vision: the `weights.VisionEncoder` (its preprocessing and tower).
    scenes: `toy.world.Scene`s.
    image_size: the world's image side.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from realcustom_jax import encoders  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  images, masks = zip(*[toy_world.render(sc, image_size) for sc in scenes])
  pixels = encoders.preprocess_subject([Image.fromarray(i) for i in images], vision)
  feats = np.asarray(encoders.image_features(vision.model, vision.params, pixels), np.float64)
  return feats, token_object_area(np.stack(masks), feats.shape[1])


def priority(kind: str, areas: np.ndarray, seed: int = 0) -> np.ndarray:
  """(B, n) float32 order for Eq. 10's top-k: higher is kept first.

  Ties in object area are broken by a fixed random jitter far below any area step, so
  that the oracle does not prefer low token indices.
  """
  if kind not in PRIORITIES:
    raise ValueError(f'priority must be one of {PRIORITIES}, got {kind!r}')
  rng = np.random.default_rng(seed)
  jitter = rng.uniform(0.0, 1e-4, areas.shape)
  if kind == 'oracle':
    order = areas + jitter
  elif kind == 'anti_oracle':
    order = -areas + jitter
  else:
    order = rng.uniform(size=areas.shape)
  return order.astype(np.float32)


def kept_count(gamma_num: float, num_tokens: int) -> int:
  """Eq. 10's k (selection.num_selected's rule, in numpy)."""
  return int(np.floor(np.float32(gamma_num) * num_tokens + 1e-3))


def selection_stats(selections: np.ndarray, areas: np.ndarray) -> dict:
  """Selection precision of the kept tokens against random and oracle choices.

  Args:
    selections: (S, B, n) bool, the tokens kept at each sampling step.
    areas: (B, n) object share per token (`token_object_area`).

  Returns:
    {'precision', 'random_precision', 'oracle_precision': floats, the mean over steps
     and samples of the object share among the kept tokens (a random choice keeps the
     token mean in expectation; the oracle keeps the k largest);
     'dropped_object_area': (B,) the share of each sample's object area that was not
     kept, averaged over steps}.
  """
  sel = np.asarray(selections, np.float64)
  areas = np.asarray(areas, np.float64)
  k = sel.sum(axis=-1)  # (S, B)
  precision = (sel * areas[None]).sum(-1) / np.maximum(k, 1)
  ordered = -np.sort(-areas, axis=-1)  # (B, n) largest first
  cumulative = np.concatenate([np.zeros((areas.shape[0], 1)), np.cumsum(ordered, -1)], -1)
  kk = k.astype(int)
  oracle = np.take_along_axis(cumulative[None].repeat(sel.shape[0], 0), kk[..., None],
                              -1)[..., 0] / np.maximum(k, 1)
  total = np.maximum(areas.sum(-1), 1e-12)  # (B,)
  dropped = ((1.0 - sel) * areas[None]).sum(-1) / total[None]  # (S, B)
  return {'precision': float(precision.mean()),
          'random_precision': float(areas.mean()),
          'oracle_precision': float(oracle.mean()),
          'dropped_object_area': dropped.mean(axis=0)}


def object_token_probe(features: np.ndarray, areas: np.ndarray, steps: int = 300,
                       threshold: float = 0.5) -> dict:
  """Can a linear read-out of one token's features tell object from background?

  What the score nets would need from the subject encoder: a logistic regression
  (standardised features, full-batch gradient descent) trained on the first three
  quarters of the tokens to predict "more than `threshold` of this token is object",
  scored on the last quarter.

  Args:
    features: (B, n, c) the subject tokens as the adapter reads them.
    areas: (B, n) their object shares (`token_object_area`).

  Returns:
    {'accuracy': held-out accuracy, 'majority': the held-out share of the larger class
     (what a constant guess gets), 'object_share': the share of object tokens}.
  """
  x = np.asarray(features, np.float64).reshape(-1, features.shape[-1])
  y = (np.asarray(areas) > threshold).reshape(-1).astype(np.float64)
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  n = len(x) * 3 // 4
  if n == 0 or n == len(x):
    raise ValueError(f'{len(x)} tokens are too few to probe')
  w = np.zeros(x.shape[1])
  for _ in range(steps):
    p = 1.0 / (1.0 + np.exp(-x[:n] @ w))
    w -= 0.5 * x[:n].T @ (p - y[:n]) / n
  held_out = y[n:]
  return {'accuracy': float(np.mean(((x[n:] @ w) > 0) == held_out)),
          'majority': float(max(held_out.mean(), 1.0 - held_out.mean())),
          'object_share': float(y.mean())}
