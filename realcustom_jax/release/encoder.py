"""The authors' released subject encoder, in Flax, and its projector's conversion.

The release (`bytedance/RealCustom`, `configs/realcustom_sigdino_highres.json`) encodes
the reference image with `ShallowDeepPatchfySiglipDinoEncoder`
(`models/image_encoder_siglipdino_shallowdeep.py`) and maps the features to the UNet's
cross-attention width with `ProjectorHighResMinAttn` (`models/projectors.py`).

Encoder, for a reference image of side R = 2 x 384 = 768 (pixels in [0, 1]):

1. global view: the whole image resized to 384 (`F.interpolate`, bilinear,
   align_corners=True);
2. local views: einops `b c (h hp) (w wp) -> (b hp wp) c h w` with hp = wp = 2, i.e.
   the four pixel-strided sub-images image[hp::2, wp::2] -- every local view covers the
   whole image at half resolution, one pixel phase each (they are not tiles / crops);
3. every view goes tensor -> PIL (`ToPILImage`: uint8 = trunc(x * 255)) -> timm's eval
   transform, which for a 384 x 384 view is a no-op resize (PIL returns a copy), then
   ToTensor (/ 255) and the model's mean / std;
4. SigLIP so400m (block 25 of 27) and DINOv2-L reg4 (block 22 of 24) features
   (`realcustom_jax.release.vit`), concatenated on channels: 1152 + 1024 = 2176;
5. the local views' features are interleaved `(b hp wp) l c -> b (l hp wp) c`:
   token l of the four views in a row, 4 x 729 = 2916 tokens.

Output: (global (B, 729, 2176), local (B, 2916, 2176)). Images here are NHWC; run the
encoder under `jax.jit` (see `resize_bilinear_align_corners` for why it matters). Not
here: the release's own preparation of the 768 px reference (ToTensor, then bilinear
align_corners=False resize) and its all-zero negative reference, both pipeline steps.

Projector (the module: `realcustom_jax.release.projector.SubjectProjector`): MinAttention
(queries: LayerNorm `norm1` of the global features; keys and values: LayerNorm `norm2`
of the local ones; 34 heads of 64, no output projection), then
Linear(2176 -> 8704), GELU, Linear(-> 2048), GELU, Linear(2048 -> 2048), LayerNorm, plus
`projector_base`, a Linear(2176 -> 2048) of the global features, summed.

Vision encoder directory (`--vision_encoder DIR`): the two timm hub repositories side
by side, as the release's `ckpts/` folder holds them:

  DIR/vit_so400m_patch14_siglip_384/          config.json, model.safetensors
  DIR/vit_large_patch14_reg4_dinov2.lvd142m/  config.json, model.safetensors

  huggingface-cli download timm/vit_so400m_patch14_siglip_384 \
      --local-dir DIR/vit_so400m_patch14_siglip_384
  huggingface-cli download timm/vit_large_patch14_reg4_dinov2.lvd142m \
      --local-dir DIR/vit_large_patch14_reg4_dinov2.lvd142m
"""
import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax.release.projector import RELEASE_DIM_HEAD
from realcustom_jax.release.projector import SubjectProjector
from realcustom_jax.release import vit
from realcustom_jax.loading import weights

Array = jax.Array
Params = dict[str, Any]

SIGLIP_DIR = 'vit_so400m_patch14_siglip_384'
DINO_DIR = 'vit_large_patch14_reg4_dinov2.lvd142m'
# The release's settings (configs/realcustom_sigdino_highres.json).
RELEASE_IMAGE_SIZE = 384
RELEASE_SIGLIP_LAYERS = (25,)
RELEASE_DINO_LAYERS = (22,)
RELEASE_PATCHIFY_SCALE = 2
# Where the projector sits in the release's UNet state dict (RealCustom_highres.pth).
RELEASE_PROJECTOR_PREFIX = 'encoder_hidden_states_vision_projection.'


# ---------------------------------------------------------------------------------
# Preprocessing (pure jnp, static shapes)
# ---------------------------------------------------------------------------------


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, ...]:
  """Source indices and weights of torch's align_corners=True linear resize, in float32.

  As ATen's `area_pixel_compute_scale` / `compute_source_index_and_lambda`: scale =
  float32(in - 1) / (out - 1), src = scale * i, lambda = src - floor(src).
  """
  f32 = np.float32
  if in_size == out_size:
    idx = np.arange(out_size)
    return idx, idx, np.ones(out_size, f32), np.zeros(out_size, f32)
  scale = f32(in_size - 1) / f32(out_size - 1) if out_size > 1 else f32(0)
  src = (scale * np.arange(out_size, dtype=f32)).astype(f32)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - i0.astype(f32), f32(0), f32(1)).astype(f32)
  i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
  return i0, i1, (f32(1) - lam).astype(f32), lam


def resize_bilinear_align_corners(images: Array, size: int) -> Array:
  """`F.interpolate(mode='bilinear', align_corners=True)` of NHWC images, float32.

  The release's global view. The uint8 quantisation that follows turns one-ulp
  differences into one-level ones wherever x * 255 sits on an integer -- all over the
  flat regions of an 8-bit image -- so the arithmetic follows torch's generic CPU kernel
  (the one a multi-threaded 768 -> 384 resize takes; its CUDA kernel has the same
  structure): along W then H, each step `a * w0 + b * w1` in float32, which both GCC
  (torch) and XLA:CPU contract to fma(a, w0, b * w1). Under jit on CPU the views of
  a 768 px random and an 8-bit image match torch (2 threads) in all 884,736 pixels;
  un-jitted (no fusion, no fma) 4 pixels differ by one level. torch itself is not
  consistent here: with one thread it takes its channels-last kernel, which differs
  from its 2-thread result in 3,896 of those pixels.

  Args:
    images: (B, H, H, C) float32.
    size: output side.

  Returns:
    (B, size, size, C) float32.
  """
  images = images.astype(jnp.float32)
  i0, i1, w0, w1 = _linear_taps(images.shape[1], size)
  rows0, rows1 = images[:, i0], images[:, i1]
  along_w = lambda r: r[:, :, i0] * w0[:, None] + r[:, :, i1] * w1[:, None]
  return along_w(rows0) * w0[:, None, None] + along_w(rows1) * w1[:, None, None]


def local_views(images: Array, scale: int) -> Array:
  """einops `b c (h hp) (w wp) -> (b hp wp) c h w`, for NHWC images.

  View (b, hp, wp) is images[b, hp::scale, wp::scale]: a pixel-strided sub-image.
  """
  b, r, _, c = images.shape
  s = r // scale
  x = images.reshape(b, s, scale, s, scale, c)
  return x.transpose(0, 2, 4, 1, 3, 5).reshape(b * scale * scale, s, s, c)


def to_uint8(images: Array) -> Array:
  """torchvision `ToPILImage` on float images: uint8(trunc(x * 255)).

  Values in [0, 1] match exactly; out-of-range values are clipped (torch's cast would
  wrap them).
  """
  levels = jnp.floor(images.astype(jnp.float32) * jnp.float32(255))
  return jnp.clip(levels, 0, 255).astype(jnp.uint8)


def normalize(levels: Array, mean: Sequence[float], std: Sequence[float]) -> Array:
  """timm eval transform on a PIL view of the run size: ToTensor (/ 255), Normalize."""
  x = levels.astype(jnp.float32) / jnp.float32(255)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def reference_views(image_ref: Array, image_size: int, scale: int) -> Array:
  """The release's uint8 views of reference images: B global ones, then B*scale^2 local.

  Args:
    image_ref: (B, R, R, 3) float in [0, 1], R == scale * image_size.
    image_size: view side (the ViTs' input size).
    scale: the patchify scale.

  Returns:
    (B + B * scale**2, image_size, image_size, 3) uint8; local views in (b, hp, wp)
    order.

  Raises:
    ValueError: a reference image of another shape.
  """
  want = scale * image_size
  if image_ref.ndim != 4 or image_ref.shape[1:] != (want, want, 3):
    raise ValueError(
        f'reference images must be (B, {want}, {want}, 3) (patchify scale {scale} x '
        f'image size {image_size}), got {tuple(image_ref.shape)}')
  image_ref = image_ref.astype(jnp.float32)
  views = jnp.concatenate([resize_bilinear_align_corners(image_ref, image_size),
                           local_views(image_ref, scale)])
  return to_uint8(views)


def interleave_local_tokens(features: Array, batch: int, scale: int) -> Array:
  """einops `(b hp wp) l c -> b (l hp wp) c`: token l of every local view in a row."""
  _, l, c = features.shape
  x = features.reshape(batch, scale * scale, l, c)
  return x.transpose(0, 2, 1, 3).reshape(batch, l * scale * scale, c)


# ---------------------------------------------------------------------------------
# Encoder
# ---------------------------------------------------------------------------------


class SubjectEncoder(nn.Module):
  """The release's `ShallowDeepPatchfySiglipDinoEncoder` (patchify scale >= 2).

  Params: {'siglip': ViT params, 'dino': ViT params}.

  Attributes:
    siglip: SigLIP ViT config (img_size = image_size).
    dino: DINOv2 ViT config (img_size = image_size).
    siglip_layers: SigLIP block indices (the release: (25,)).
    dino_layers: DINOv2 block indices (the release: (22,)); as many as siglip_layers.
    siglip_mean, siglip_std, dino_mean, dino_std: each model's normalisation.
    image_size: view side (the release: 384).
    patchify_scale: the reference image is patchify_scale * image_size wide (2).
    dtype: computation dtype of the ViTs.
  """
  siglip: vit.ViTConfig
  dino: vit.ViTConfig
  siglip_layers: tuple[int, ...] = RELEASE_SIGLIP_LAYERS
  dino_layers: tuple[int, ...] = RELEASE_DINO_LAYERS
  siglip_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
  siglip_std: tuple[float, ...] = (0.5, 0.5, 0.5)
  dino_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
  dino_std: tuple[float, ...] = (0.229, 0.224, 0.225)
  image_size: int = RELEASE_IMAGE_SIZE
  patchify_scale: int = RELEASE_PATCHIFY_SCALE
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image_ref: Array) -> tuple[Array, ...]:
    """Encodes reference images as the release does.

    Args:
      image_ref: (B, R, R, 3) float pixels in [0, 1], R = patchify_scale * image_size.

    Returns:
      As the release's list: one (B, n, C) global feature array per layer pair
      (SigLIP then DINOv2 channels, n = grid**2), then the local deep features
      (B, n * patchify_scale**2, C) of the deepest pair.

    Raises:
      ValueError: wrong image shape or inconsistent settings.
    """
    if self.patchify_scale < 2:
      raise ValueError(f'patchify_scale must be >= 2, got {self.patchify_scale}')
    if len(self.siglip_layers) != len(self.dino_layers):
      raise ValueError(f'siglip_layers {self.siglip_layers} and dino_layers '
                       f'{self.dino_layers} must pair up')
    for name, c in (('siglip', self.siglip), ('dino', self.dino)):
      if c.img_size != self.image_size:
        raise ValueError(f'{name} runs at {c.img_size} px, the encoder at {self.image_size}')
    b = image_ref.shape[0]
    views = reference_views(image_ref, self.image_size, self.patchify_scale)
    # One pass per ViT over global + local views: a view's features do not depend on
    # the other views of the batch.
    sig = vit.VisionTransformer(self.siglip, self.dtype, name='siglip')(
        normalize(views, self.siglip_mean, self.siglip_std), self.siglip_layers)
    dino = vit.VisionTransformer(self.dino, self.dtype, name='dino')(
        normalize(views, self.dino_mean, self.dino_std), self.dino_layers)
    cat = lambda s, d: jnp.concatenate([s, d], axis=-1).astype(jnp.float32)
    global_features = [cat(s[:b], d[:b]) for s, d in zip(sig, dino)]
    local = cat(sig[-1][b:], dino[-1][b:])
    return (*global_features,
            interleave_local_tokens(local, b, self.patchify_scale))


@dataclasses.dataclass
class LoadedEncoder:
  """A SubjectEncoder with its parameters (`module.apply({'params': params}, image)`)."""
  module: SubjectEncoder
  params: Params = dataclasses.field(repr=False)

  @property
  def feature_dim(self) -> int:
    return self.module.siglip.embed_dim + self.module.dino.embed_dim


def load_subject_encoder(path: str, image_size: int = RELEASE_IMAGE_SIZE,
                         siglip_layers: Sequence[int] = RELEASE_SIGLIP_LAYERS,
                         dino_layers: Sequence[int] = RELEASE_DINO_LAYERS,
                         patchify_scale: int = RELEASE_PATCHIFY_SCALE,
                         dtype=jnp.float32) -> LoadedEncoder:
  """Loads the two timm ViTs of a vision encoder directory (module docstring) torch-free.

  Args:
    path: directory with the SIGLIP_DIR and DINO_DIR subdirectories.
    image_size: view side; position embeddings made for another grid are resampled.
    siglip_layers: SigLIP blocks to read (0-based, negative from the end).
    dino_layers: DINOv2 blocks to read.
    patchify_scale: reference side / image_size.
    dtype: parameter and computation dtype.

  Returns:
    The LoadedEncoder.

  Raises:
    weights.CheckpointError: a missing directory or file, or weights that do not fit.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise weights.CheckpointError(f'vision encoder directory {path} does not exist')
  for sub in (SIGLIP_DIR, DINO_DIR):
    if not os.path.isdir(os.path.join(path, sub)):
      raise weights.CheckpointError(
          f'{path} has no {sub}/ subfolder: expected the timm hub repositories '
          f'{SIGLIP_DIR} and {DINO_DIR} side by side')
  loaded = {}
  for key, sub, layers in (('siglip', SIGLIP_DIR, siglip_layers),
                           ('dino', DINO_DIR, dino_layers)):
    folder = os.path.join(path, sub)
    loaded[key] = vit.load_vit(folder, image_size, dtype)
    try:
      vit.block_indices(tuple(layers), loaded[key].config.depth)
    except ValueError as e:
      raise weights.CheckpointError(f'{folder}: {e}') from None
  module = SubjectEncoder(
      siglip=loaded['siglip'].config, dino=loaded['dino'].config,
      siglip_layers=tuple(siglip_layers), dino_layers=tuple(dino_layers),
      siglip_mean=loaded['siglip'].mean, siglip_std=loaded['siglip'].std,
      dino_mean=loaded['dino'].mean, dino_std=loaded['dino'].std,
      image_size=image_size, patchify_scale=patchify_scale, dtype=dtype)
  return LoadedEncoder(module, {'siglip': loaded['siglip'].params,
                                'dino': loaded['dino'].params})


def _projector_torch_key(path: tuple[str, ...]) -> str:
  *mods, leaf = path
  mods = [m.replace('projector_', 'projector.') if m[-1].isdigit() else m for m in mods]
  return '.'.join(mods + [{'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)])


def projector_from_torch_state(state: Mapping[str, np.ndarray],
                               dim_head: int = RELEASE_DIM_HEAD, prefix: str = '',
                               where: str = 'projector state', dtype=jnp.float32
                               ) -> tuple[SubjectProjector, Params]:
  """Builds the projector and its params from the release's torch state dict.

  Args:
    state: name -> NumPy array, `ProjectorHighResMinAttn.state_dict()` keys under
      `prefix` (RELEASE_PROJECTOR_PREFIX for the release's UNet checkpoint).
    dim_head: MinAttention head width (not recoverable from the shapes).
    prefix: key prefix; other keys are ignored.
    where: what to name in errors.
    dtype: parameter dtype.

  Returns:
    (SubjectProjector, params); widths read from the tensors.

  Raises:
    weights.CheckpointError: missing, extra or misshapen tensors.
  """
  sub = {k[len(prefix):]: np.asarray(v) for k, v in state.items() if k.startswith(prefix)}
  for key in ('min_attention.norm1.weight', 'projector_base.weight'):
    if key not in sub:
      raise weights.CheckpointError(f'{where} lacks {prefix}{key}: not the release\'s '
                                    'ProjectorHighResMinAttn')
  if 'scale_value.value' in sub:
    raise weights.CheckpointError(
        f'{where}: adaptive_scale projectors are not supported (the release has none)')
  vision_dim = sub['min_attention.norm1.weight'].shape[0]
  out_dim = sub['projector_base.weight'].shape[0]
  if vision_dim % dim_head:
    raise weights.CheckpointError(
        f'{where}: vision width {vision_dim} is not a multiple of dim_head {dim_head}')
  module = SubjectProjector(vision_dim, out_dim, dim_head, dtype)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 1, vision_dim)), jnp.zeros((1, 1, vision_dim)))
  out = {}
  for key, shape in traverse_util.flatten_dict(shapes['params']).items():
    name = _projector_torch_key(key)
    if name not in sub:
      raise weights.CheckpointError(f'{where} lacks {prefix}{name}')
    value = sub.pop(name)
    kernel = key[-1] == 'kernel'
    want = tuple(reversed(shape.shape)) if kernel else tuple(shape.shape)
    if value.shape != want:
      raise weights.CheckpointError(f'{where}: {prefix}{name} has shape {value.shape}, '
                                    f'expected {want} (dim_head={dim_head})')
    out[key] = jnp.asarray(value.T if kernel else value, dtype)
  if sub:
    raise weights.CheckpointError(
        f'{where} has unexpected tensor(s) {", ".join(sorted(prefix + k for k in sub)[:3])}')
  return module, traverse_util.unflatten_dict(out)
