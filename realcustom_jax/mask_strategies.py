"""The authors' released mask strategies (`inference/mask_generation.py`), in JAX.

The release (github.com/bytedance/RealCustom) builds its influence mask differently from
the paper's Eq. 11 (`mask.influence_scope`): every layer's target-word map is resized to
half the latent size (not the largest map size), the layers are averaged, then one
normalisation (`mask_mode` names it) and a top-k or threshold selection follow, with an
optional refinement by self-attention maps. The mode is a tuple of names, as the
release's `--mask_strategy` list; what each name does:

  'max_norm'             divide by the per-sample maximum (+1e-6). The release's default.
  'min_max_norm'         (m - min) / (max - min + 1e-6), per sample.
  'min_max_per_channel'  min-max per layer first (+1e-6), then average, then min-max
                         again (+1e-6).
  (none of the three)    the plain layer average, never refined by self maps.
  'threshold'            zero below 1 - mask_scope instead of keeping the top
                         int(mask_scope * H * W) positions.
  'binary'               ones where kept (top-k), or above the threshold ('threshold').
  'selfmap_min_max_per_channel' / 'selfmap_max_norm'
                         normalise the self-attention maps per channel (+1e-6) or by the
                         per-sample maximum (+1e-10) before they refine the cross map
                         (m <- S m, S the channel-averaged self map). Only with self maps.

The release checks the three cross normalisations in that order (if / elif), and the
two self-map ones likewise; extra names are ignored, so ('max_norm', 'min_max_norm')
is 'max_norm'. Its scripts also list 'crossmap_32', 'selfmap_64', 'selfmap' and
'decoder_map', which none of its code reads: they are accepted here and change nothing
(`INERT_MODES`). Its published UNet never returns self-attention maps, so in the
release's own pipeline the self-map names are inert too; `release_mask` implements them
as `mask_generation` defines them for when maps are given.

Deliberate details, matching the release: bilinear resizing without antialiasing and
with half-pixel centres (torch's `align_corners=False`), also for the (N, N) self maps,
which are resized as images over their flattened indices.

Top-k ties and counts: the count is floor(mask_scope * H * W) in float32 with a 1e-3
slack (`selection.num_selected`, shared with Eq. 10 and 11) so that a traced scope such
as 0.7 keeps 7 of 10. It equals the release's int(H * W * mask_scope) (float64) except
where that float64 product falls within 1e-3 below an integer (e.g. int(100 * 0.29) is
28 there, 29 here). Equal values are ranked by position (a stable sort: the lower
row-major index first); torch's sort leaves their order unspecified, so with ties at the
boundary the two may keep different positions. The fixtures have no ties.
"""
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from realcustom_jax.selection import check_unit_interval
from realcustom_jax.selection import top_fraction_mask

Array = jax.Array

CROSS_NORMS = ('max_norm', 'min_max_norm', 'min_max_per_channel')  # release priority order
SELF_NORMS = ('selfmap_min_max_per_channel', 'selfmap_max_norm')   # likewise
SELECTIONS = ('binary', 'threshold')
# Listed in the release's scripts; read by none of its code.
INERT_MODES = ('crossmap_32', 'selfmap_64', 'selfmap', 'decoder_map')
RELEASE_MASK_MODES = CROSS_NORMS + SELECTIONS + SELF_NORMS + INERT_MODES
# The release's default (`inference_single_image.py --mask_strategy`).
DEFAULT_MODE = ('max_norm',)

# The release's epsilons.
_EPS = 1e-6
_EPS_SELF_MAX = 1e-10


def check_mode(mode: Union[str, Sequence[str]]) -> tuple[str, ...]:
  """The canonical mode tuple (known names, each once, in `RELEASE_MASK_MODES` order).

  Canonical so that two spellings of one mode share one jit cache entry.

  Raises:
    ValueError: an empty mode or an unknown name.
  """
  names = (mode,) if isinstance(mode, str) else tuple(mode)
  unknown = [n for n in names if n not in RELEASE_MASK_MODES]
  if not names or unknown:
    raise ValueError(f'unknown release mask mode {unknown or names!r}: use names from '
                     f'{RELEASE_MASK_MODES}')
  return tuple(n for n in RELEASE_MASK_MODES if n in names)


def uses_self_maps(mode: Sequence[str]) -> bool:
  """Whether the mode asks for a self-map normalisation (so self maps are collected)."""
  return any(n in mode for n in SELF_NORMS)


def mask_size(latent_height: int, latent_width: int) -> tuple[int, int]:
  """The release's mask resolution: half the latent size (64 x 64 at 1024 px in SDXL)."""
  return latent_height // 2, latent_width // 2


def _resize(x: Array, shape: tuple[int, ...]) -> Array:
  """torch `F.interpolate(mode='bilinear')` (align_corners False, no antialias)."""
  if x.shape == tuple(shape):
    return x
  return jax.image.resize(x, shape, 'bilinear', antialias=False)


def stack_cross_maps(word_maps: Sequence[Array], size: tuple[int, int]) -> Array:
  """Every layer's target-word map resized to `size`, flattened: (B, L, H*W).

  Args:
    word_maps: per-layer (B, h, w) maps (head-averaged, summed over the word's tokens:
      what `attention.word_attention_map` sows and the release computes in
      `mask_generation`).
    size: (H, W), the mask resolution.
  """
  if not word_maps:
    raise ValueError('no word maps: the UNet has no cross-attention layer')
  b = word_maps[0].shape[0]
  resized = [_resize(m.astype(jnp.float32), (b,) + tuple(size)) for m in word_maps]
  return jnp.stack(resized, axis=1).reshape(b, len(resized), size[0] * size[1])


def self_map(self_maps: Sequence[Array], n: int, mode: Sequence[str]) -> Array:
  """The channel-averaged self-attention map the release refines with: (B, n, n).

  Each (B, c, N, N) map is resized to (n, n) (over its flattened indices, as the
  release does), the channels of all layers are pooled, normalised by the mode's
  self-map normalisation (if any) and averaged.

  Args:
    self_maps: per-layer (B, c, N, N) self-attention probabilities (c: heads).
    n: H*W of the mask.
    mode: the canonical mode tuple.
  """
  b = self_maps[0].shape[0]
  maps = jnp.concatenate(
      [_resize(s.astype(jnp.float32), (b, s.shape[1], n, n)) for s in self_maps], axis=1)
  if 'selfmap_min_max_per_channel' in mode:
    low = jnp.min(maps, axis=(2, 3), keepdims=True)
    high = jnp.max(maps, axis=(2, 3), keepdims=True)
    maps = (maps - low) / (high - low + _EPS)
  elif 'selfmap_max_norm' in mode:
    maps = maps / (jnp.max(maps, axis=(1, 2, 3), keepdims=True) + _EPS_SELF_MAX)
  return jnp.mean(maps, axis=1)


def _min_max(m: Array) -> Array:
  """(m - min) / (max - min + 1e-6) over the last axis."""
  low = jnp.min(m, axis=-1, keepdims=True)
  high = jnp.max(m, axis=-1, keepdims=True)
  return (m - low) / (high - low + _EPS)


def normalized_cross_map(cross: Array, mode: Sequence[str],
                         selfmap: Optional[Array] = None) -> Array:
  """The release's layer average, self-map refinement and normalisation: (B, N).

  Args:
    cross: (B, L, N) per-layer maps at the mask resolution (`stack_cross_maps`).
    mode: the canonical mode tuple.
    selfmap: optional (B, N, N) channel-averaged self map (`self_map`); ignored without
      a cross normalisation, as in the release.
  """
  def refine(m):
    if selfmap is None:
      return m
    return jnp.einsum('bqk,bk->bq', selfmap, m, precision=jax.lax.Precision.HIGHEST)

  if 'max_norm' in mode:
    m = refine(jnp.mean(cross, axis=1))
    return m / (jnp.max(m, axis=-1, keepdims=True) + _EPS)
  if 'min_max_norm' in mode:
    return _min_max(refine(jnp.mean(cross, axis=1)))
  if 'min_max_per_channel' in mode:
    return _min_max(refine(jnp.mean(_min_max(cross), axis=1)))
  return jnp.mean(cross, axis=1)


def select_scope(m: Array, mask_scope, mode: Sequence[str]) -> Array:
  """The release's top-k (or threshold) selection of a normalised map, (B, N) -> (B, N).

  Top-k (default): keeps the floor(mask_scope * N) highest values (ones with 'binary'),
  zero elsewhere. 'threshold': zeroes values below 1 - mask_scope; with 'binary', values
  above it become one (a value equal to it is kept as it is, as in the release).

  Args:
    m: (B, N) normalised map.
    mask_scope: the kept fraction in [0, 1]; may be traced.
    mode: the canonical mode tuple.
  """
  binary = 'binary' in mode
  if 'threshold' in mode:
    threshold = 1.0 - jnp.asarray(mask_scope, jnp.float32)
    m = jnp.where(m < threshold, 0.0, m)
    return jnp.where(m > threshold, 1.0, m) if binary else m
  keep = top_fraction_mask(m, mask_scope)
  return jnp.where(keep, 1.0 if binary else m, 0.0)


def release_mask(word_maps: Sequence[Array], mask_scope, size: tuple[int, int],
                 mode: Union[str, Sequence[str]] = DEFAULT_MODE,
                 self_maps: Optional[Sequence[Array]] = None) -> Array:
  """The release's `mask_generation`: the influence mask of one or several subjects.

  Args:
    word_maps: per-layer target-word maps, (B, h, w) for one subject or (B, R, h, w)
      for R reference subjects (each its own word; the masks are computed per
      reference, as the release's multi-reference processor expects them).
    mask_scope: the kept fraction in [0, 1] (the release's `--mask_scope`); may be
      traced (a concrete value outside [0, 1] is refused).
    size: (H, W) mask resolution (`mask_size`: half the latent size in the release).
    mode: the mode names (see the module docstring); checked and made canonical here.
    self_maps: optional per-layer (B, c, N, N) self-attention probabilities; used only
      when the mode has a cross normalisation (as in the release). None or empty: no
      refinement.

  Returns:
    (B, H, W) or (B, R, H, W) float32 mask.

  Raises:
    ValueError: an unknown mode name or a concrete mask_scope outside [0, 1].
  """
  mode = check_mode(mode)
  check_unit_interval('mask_scope', mask_scope)
  maps = list(word_maps)
  lead = maps[0].shape[:-2]  # (B,) or (B, R)
  refs = 1 if len(lead) == 1 else lead[1]
  # References fold into the batch: the release normalises each reference's mask alone.
  maps = [m.reshape((-1,) + m.shape[-2:]) for m in maps]
  selfmap = None
  if self_maps:
    selfmap = jnp.repeat(self_map(self_maps, size[0] * size[1], mode), refs, axis=0)
  m = normalized_cross_map(stack_cross_maps(maps, size), mode, selfmap)
  return select_scope(m, mask_scope, mode).reshape(tuple(lead) + tuple(size))
