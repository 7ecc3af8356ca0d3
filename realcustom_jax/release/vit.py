"""timm's VisionTransformer in Flax, as the release's subject encoder uses it.

Covers the two ViTs of the authors' release (`bytedance/RealCustom`,
`models/sigclip.py` and `models/dino.py`), with timm's own numerics:

- `vit_so400m_patch14_siglip_384`: no class token, exact (erf) GELU, MLP ratio 3.7362,
  pos-embed on the 27 x 27 patches only;
- `vit_large_patch14_reg4_dinov2` (`.lvd142m`): a class token and 4 register tokens
  without position embedding (`no_embed_class`), LayerScale on both residual branches.

Both are pre-norm blocks with LayerNorm eps 1e-6 and biased qkv. The release reads
`get_intermediate_layers(n={k})`: the output of block k (0-based), before the final norm,
with the prefix (class / register) tokens dropped -- `intermediate_features` here.

Checkpoint layout (what one ViT directory holds): the files of the timm Hugging Face hub
repository, e.g. `huggingface-cli download timm/vit_so400m_patch14_siglip_384
--local-dir DIR`:

  DIR/config.json         timm's hub config: "architecture" (e.g.
                          "vit_so400m_patch14_siglip_384"), optional "model_args"
                          (overrides of the architecture's arguments, as timm's
                          `push_to_hub(model_args=...)` writes them) and "pretrained_cfg"
                          ("mean", "std": the normalisation the model was trained with).
  DIR/model.safetensors   the state dict in timm's key layout (`blocks.0.attn.qkv.weight`,
                          ...), read without torch.

The MAP / classifier heads and the final norm are not used by the release and are not
loaded. When the run image size gives another patch grid than the checkpoint's (DINOv2 is
trained at 518 px = 37 x 37 patches, the release runs it at 384 px = 27 x 27), the
position embedding is resampled as timm does when it loads such a checkpoint
(`resample_abs_pos_embed`: bicubic, antialiased, half-pixel centres, prefix entries kept).
"""
import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from realcustom_jax.loading import weights

Array = jax.Array
Params = dict[str, Any]

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
LAYER_NORM_EPS = 1e-6  # timm.layers.LayerNorm's default, used by both ViTs

# The timm model functions' own arguments (timm 1.0.x `vision_transformer.py`); the
# VisionTransformer defaults fill in the rest (class token, qkv bias, MLP ratio 4, GELU).
ARCHITECTURES = {
    'vit_so400m_patch14_siglip_384': dict(
        patch_size=14, embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362,
        class_token=False, img_size=384),
    'vit_large_patch14_reg4_dinov2': dict(
        patch_size=14, embed_dim=1024, depth=24, num_heads=16, init_values=1e-5,
        reg_tokens=4, no_embed_class=True, img_size=518),
}
_DEFAULT_ARGS = dict(
    mlp_ratio=4.0, class_token=True, reg_tokens=0, no_embed_class=False, init_values=None,
    qkv_bias=True, act_layer=None, img_size=224)
# Arguments that change nothing the intermediate features depend on.
_IGNORED_ARGS = ('global_pool', 'num_classes', 'fc_norm', 'drop_rate', 'pos_drop_rate',
                 'patch_drop_rate', 'proj_drop_rate', 'attn_drop_rate', 'drop_path_rate',
                 'pretrained_cfg', 'pretrained_cfg_overlay')
# Each needs code this module does not have; refused unless at timm's default.
_FIXED_ARGS = dict(pre_norm=False, qk_norm=False, dynamic_img_size=False,
                   dynamic_img_pad=False, in_chans=3, pos_embed='learn', embed_norm_layer=None,
                   proj_bias=True, patch_bias=True)
_GELU = {None: False, 'gelu': False, 'gelu_tanh': True}
# Checkpoint entries of parts the release never runs.
_UNUSED_PREFIXES = ('norm.', 'fc_norm.', 'head.', 'head_drop.', 'attn_pool.')


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of one timm VisionTransformer, at the image size it is run at.

  Attributes:
    img_size: side of the (square) input image in pixels.
    patch_size: patch side; the grid is img_size // patch_size (leftover pixels at the
      right / bottom are dropped, as timm's stride-p convolution does: 384 px -> 27).
    embed_dim: token width.
    depth: number of blocks.
    num_heads: attention heads.
    mlp_dim: MLP hidden width, int(embed_dim * mlp_ratio) as timm computes it.
    class_token: a learnt class token is prepended.
    reg_tokens: number of learnt register tokens after the class token.
    no_embed_class: the position embedding covers the patches only (added before the
      prefix tokens are prepended); otherwise it also has entries for the prefix.
    layer_scale: LayerScale (`ls1`, `ls2`: per-channel gammas) on the residual branches.
    gelu_tanh: tanh-approximated GELU (timm 'gelu_tanh'); exact erf GELU otherwise.
    qkv_bias: the qkv projection has a bias.
  """
  img_size: int
  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_dim: int
  class_token: bool = True
  reg_tokens: int = 0
  no_embed_class: bool = False
  layer_scale: bool = False
  gelu_tanh: bool = False
  qkv_bias: bool = True

  @property
  def grid_size(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_prefix_tokens(self) -> int:
    return int(self.class_token) + self.reg_tokens

  @property
  def pos_embed_len(self) -> int:
    extra = 0 if self.no_embed_class else self.num_prefix_tokens
    return self.grid_size ** 2 + extra


def config_from_timm_args(args: Mapping[str, Any], where: str = 'model_args') -> ViTConfig:
  """ViTConfig from timm `create_model` arguments (architecture defaults merged in).

  Raises:
    weights.CheckpointError: an argument this module does not implement.
  """
  args = {**_DEFAULT_ARGS, **args}
  for key, value in args.items():
    if key in _IGNORED_ARGS or key in _DEFAULT_ARGS or key in (
        'patch_size', 'embed_dim', 'depth', 'num_heads'):
      continue
    if key in _FIXED_ARGS and value == _FIXED_ARGS[key]:
      continue
    raise weights.CheckpointError(f'{where}: unsupported ViT argument {key}={value!r}')
  if args['act_layer'] not in _GELU:
    raise weights.CheckpointError(
        f'{where}: unsupported act_layer {args["act_layer"]!r} (gelu or gelu_tanh)')
  img_size = args['img_size']
  if isinstance(img_size, (list, tuple)):
    if len(set(img_size)) != 1:
      raise weights.CheckpointError(f'{where}: non-square img_size {img_size} unsupported')
    img_size = img_size[0]
  missing = [k for k in ('patch_size', 'embed_dim', 'depth', 'num_heads') if k not in args]
  if missing:
    raise weights.CheckpointError(f'{where}: missing ViT argument(s) {", ".join(missing)}')
  if args['embed_dim'] % args['num_heads']:
    raise weights.CheckpointError(
        f'{where}: embed_dim {args["embed_dim"]} is not a multiple of num_heads '
        f'{args["num_heads"]}')
  return ViTConfig(
      img_size=int(img_size), patch_size=int(args['patch_size']),
      embed_dim=int(args['embed_dim']), depth=int(args['depth']),
      num_heads=int(args['num_heads']),
      mlp_dim=int(args['embed_dim'] * args['mlp_ratio']),
      class_token=bool(args['class_token']), reg_tokens=int(args['reg_tokens'] or 0),
      no_embed_class=bool(args['no_embed_class']),
      layer_scale=bool(args['init_values']), gelu_tanh=_GELU[args['act_layer']],
      qkv_bias=bool(args['qkv_bias']))


# ---------------------------------------------------------------------------------
# Modules (parameter names follow timm's state dict: blocks_0/attn/qkv <- blocks.0.attn.qkv)
# ---------------------------------------------------------------------------------


class Attention(nn.Module):
  """timm `Attention`: fused qkv, softmax(q k^T / sqrt(d)) v, output projection."""
  dim: int
  num_heads: int
  qkv_bias: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, _ = x.shape
    head_dim = self.dim // self.num_heads
    qkv = nn.Dense(3 * self.dim, use_bias=self.qkv_bias, dtype=self.dtype, name='qkv')(x)
    # timm: reshape(B, N, 3, heads, head_dim): q, k, v are the three thirds of the channels.
    q, k, v = jnp.moveaxis(qkv.reshape(b, n, 3, self.num_heads, head_dim), 2, 0)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / math.sqrt(head_dim)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, self.dim)
    return nn.Dense(self.dim, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """timm `Mlp`: fc1 -> GELU -> fc2."""
  dim: int
  hidden: int
  gelu_tanh: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x)
    h = nn.gelu(h, approximate=self.gelu_tanh)
    return nn.Dense(self.dim, dtype=self.dtype, name='fc2')(h)


class LayerScale(nn.Module):
  """timm `LayerScale`: x * gamma, one learnt factor per channel."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    gamma = self.param('gamma', nn.initializers.constant(1e-5), (x.shape[-1],))
    return x * gamma.astype(x.dtype)


class Block(nn.Module):
  """timm `Block`: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype,
                                     use_fast_variance=False, name=name)
    scale = (lambda name: LayerScale(name=name)) if c.layer_scale else (
        lambda name: lambda h: h)
    h = Attention(c.embed_dim, c.num_heads, c.qkv_bias, self.dtype, name='attn')(
        norm('norm1')(x))
    x = x + scale('ls1')(h)
    h = Mlp(c.embed_dim, c.mlp_dim, c.gelu_tanh, self.dtype, name='mlp')(norm('norm2')(x))
    return x + scale('ls2')(h)


class PatchEmbed(nn.Module):
  """timm `PatchEmbed`: a stride-p p x p convolution, tokens in row-major order."""
  embed_dim: int
  patch_size: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='proj')(pixels)
    return x.reshape(x.shape[0], -1, self.embed_dim)


def block_indices(layers: Sequence[int], depth: int) -> tuple[int, ...]:
  """Absolute, sorted, de-duplicated block indices, as timm's `feature_take_indices`.

  Negative indices count from the end (-1 = last block).

  Raises:
    ValueError: an index outside the model.
  """
  if not layers:
    raise ValueError('need at least one block index')
  out = set()
  for i in layers:
    j = depth + i if i < 0 else i
    if not 0 <= j < depth:
      raise ValueError(f'block index {i} is out of range for a {depth}-block ViT')
    out.add(int(j))
  return tuple(sorted(out))


class VisionTransformer(nn.Module):
  """timm's VisionTransformer trunk; returns intermediate block outputs.

  Call with pixels (B, S, S, 3), NHWC, already normalised, S == config.img_size.
  """
  config: ViTConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array, layers: Sequence[int] = (-1,)) -> tuple[Array, ...]:
    """Patch tokens after each block in `layers`, as timm's `get_intermediate_layers`.

    Args:
      pixels: (B, S, S, 3) normalised images.
      layers: block indices (0-based; negative from the end), e.g. (25,) for the
        release's SigLIP. Blocks after the deepest one asked for are not run.

    Returns:
      One (B, grid**2, embed_dim) array per distinct index, in block order: the block's
      output with the class / register tokens dropped and no final norm.
    """
    c = self.config
    if pixels.ndim != 4 or pixels.shape[1:] != (c.img_size, c.img_size, 3):
      raise ValueError(f'ViT expects images (B, {c.img_size}, {c.img_size}, 3), got '
                       f'{pixels.shape}')
    take = block_indices(layers, c.depth)
    x = PatchEmbed(c.embed_dim, c.patch_size, self.dtype, name='patch_embed')(
        pixels.astype(self.dtype))
    b = x.shape[0]
    init = nn.initializers.normal(0.02)
    pos = self.param('pos_embed', init, (1, c.pos_embed_len, c.embed_dim)).astype(x.dtype)
    prefix = []
    if c.class_token:
      prefix.append(self.param('cls_token', init, (1, 1, c.embed_dim)))
    if c.reg_tokens:
      prefix.append(self.param('reg_token', init, (1, c.reg_tokens, c.embed_dim)))
    prefix = [jnp.broadcast_to(t.astype(x.dtype), (b,) + t.shape[1:]) for t in prefix]
    if c.no_embed_class:
      x = jnp.concatenate(prefix + [x + pos], axis=1)
    else:
      x = jnp.concatenate(prefix + [x], axis=1) + pos
    features = []
    for i in range(take[-1] + 1):
      x = Block(c, self.dtype, name=f'blocks_{i}')(x)
      if i in take:
        features.append(x[:, c.num_prefix_tokens:])
    return tuple(features)


# ---------------------------------------------------------------------------------
# Loading timm checkpoints
# ---------------------------------------------------------------------------------


def resample_pos_embed(pos_embed: np.ndarray, new_grid: int,
                       num_prefix_tokens: int) -> np.ndarray:
  """timm's `resample_abs_pos_embed` for square grids (the load-time resize).

  The patch entries, seen as a (g, g, D) image, are resized to (new_grid, new_grid) with
  bicubic interpolation (Keys a = -0.5), antialiased when shrinking, half-pixel centres --
  torch's `F.interpolate(mode='bicubic', antialias=True)`, which is what timm calls. The
  first `num_prefix_tokens` entries (class token etc.) are kept unchanged.

  Args:
    pos_embed: (1, prefix + g*g, D).
    new_grid: target grid side.
    num_prefix_tokens: leading entries that are not patches.

  Returns:
    (1, prefix + new_grid**2, D) float32.
  """
  pos_embed = np.asarray(pos_embed, np.float32)
  prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
  old_grid = math.isqrt(patches.shape[1])
  if old_grid * old_grid != patches.shape[1]:
    raise ValueError(f'pos_embed has {patches.shape[1]} patch entries, not a square grid')
  if old_grid == new_grid:
    return pos_embed
  dim = patches.shape[-1]
  grid = jnp.asarray(patches.reshape(old_grid, old_grid, dim))
  resized = jax.image.resize(grid, (new_grid, new_grid, dim), method='bicubic',
                             antialias=True)
  patches = np.asarray(resized, np.float32).reshape(1, new_grid * new_grid, dim)
  return np.concatenate([prefix, patches], axis=1)


def _timm_key(path: tuple[str, ...]) -> tuple[str, bool]:
  """timm state-dict key of a Flax leaf, and whether the value is transposed."""
  *mods, leaf = path
  mods = [m.replace('blocks_', 'blocks.') for m in mods]
  name = '.'.join(mods + [{'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)])
  return name, leaf == 'kernel'


def params_from_timm_state(state: Mapping[str, np.ndarray], config: ViTConfig,
                           path: str = 'checkpoint', dtype=jnp.float32) -> Params:
  """Converts a timm ViT state dict (NumPy arrays) to VisionTransformer params.

  Linear weights are transposed, the patch convolution goes OIHW -> HWIO, LayerNorm
  weights become `scale`, and the position embedding is resampled to the config's grid.

  Raises:
    weights.CheckpointError: missing / misshapen tensors, or tensors of parts this
      module does not implement (e.g. a checkpoint in another layout).
  """
  want = _param_shapes(config)
  out, used = {}, set()
  missing = []
  for key, shape in want.items():
    name, transposed = _timm_key(key)
    if name not in state:
      missing.append(name)
      continue
    used.add(name)
    value = np.asarray(state[name])
    if name == 'patch_embed.proj.weight':
      value = value.transpose(2, 3, 1, 0)
    elif transposed:
      value = value.T
    elif name == 'pos_embed':
      extra = 0 if config.no_embed_class else config.num_prefix_tokens
      try:
        # timm resamples in float32 and casts back to the checkpoint's dtype.
        value = resample_pos_embed(value, config.grid_size, extra).astype(value.dtype)
      except ValueError as e:
        raise weights.CheckpointError(f'{path}: {e}') from None
    if value.shape != shape.shape:
      raise weights.CheckpointError(
          f'{path}: {name} has shape {state[name].shape}, the config expects '
          f'{_torch_shape(key, shape.shape)}: weights and config.json do not match')
    out[key] = jnp.asarray(value, dtype)
  if missing:
    raise weights.CheckpointError(
        f'{path} lacks {len(missing)} tensor(s) its config needs (e.g. '
        f'{", ".join(missing[:3])}): not a timm ViT checkpoint of this architecture')
  unknown = sorted(k for k in state if k not in used and not k.startswith(_UNUSED_PREFIXES))
  if unknown:
    raise weights.CheckpointError(
        f'{path} has {len(unknown)} tensor(s) this ViT does not have (e.g. '
        f'{", ".join(unknown[:3])}): config.json and weights do not match, or the file '
        'is not in timm\'s layout')
  return traverse_util.unflatten_dict(out)


def _torch_shape(key: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  if key == ('patch_embed', 'proj', 'kernel'):
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if key[-1] == 'kernel' else tuple(shape)


def _param_shapes(config: ViTConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
  """Flattened parameter shapes of the whole model, without allocating it."""
  module = VisionTransformer(config)
  pixels = jnp.zeros((1, config.img_size, config.img_size, 3), jnp.float32)
  # Every block (layers=(-1,)): a checkpoint's blocks after the ones read are loaded too.
  shapes = jax.eval_shape(lambda rng: module.init(rng, pixels, (-1,)),
                          jax.random.PRNGKey(0))['params']
  return traverse_util.flatten_dict(shapes)


def timm_state_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
  """The timm state-dict entries this ViT reads, with their (torch) shapes."""
  return {_timm_key(k)[0]: _torch_shape(k, v.shape) for k, v in _param_shapes(config).items()}


@dataclasses.dataclass
class LoadedViT:
  """A checkpoint made ready to run.

  Attributes:
    architecture: the timm architecture name from config.json.
    config: the ViTConfig at the requested image size.
    params: VisionTransformer parameters.
    mean: per-channel normalisation mean (RGB, [0, 1] units) from config.json.
    std: per-channel normalisation std.
    checkpoint_grid: patch grid side the checkpoint's position embedding was made for.
  """
  architecture: str
  config: ViTConfig
  params: Params = dataclasses.field(repr=False)
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  checkpoint_grid: int

  @property
  def module(self) -> VisionTransformer:
    return VisionTransformer(self.config)


def _read_config(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      config = json.load(f)
  except FileNotFoundError:
    raise weights.CheckpointError(f'missing config file {path}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise weights.CheckpointError(f'{path} is not valid JSON: {e}') from None
  if not isinstance(config, dict) or not isinstance(config.get('architecture'), str):
    raise weights.CheckpointError(
        f'{path} has no "architecture" entry: expected timm\'s hub config.json')
  return config


def read_timm_config(folder: str, img_size: Optional[int] = None
                     ) -> tuple[str, ViTConfig, dict[str, Any]]:
  """Architecture name, ViTConfig (at `img_size`, default the checkpoint's) and config.

  Raises:
    weights.CheckpointError: missing/invalid config.json or an unknown architecture.
  """
  path = os.path.join(folder, CONFIG_FILE)
  raw = _read_config(path)
  name = raw['architecture'].split('.')[0]  # 'vit_large_patch14_reg4_dinov2.lvd142m'
  if name not in ARCHITECTURES:
    raise weights.CheckpointError(
        f'{path}: architecture {raw["architecture"]!r} is not supported (known: '
        f'{", ".join(sorted(ARCHITECTURES))})')
  model_args = raw.get('model_args') or {}
  if not isinstance(model_args, dict):
    raise weights.CheckpointError(f'{path}: "model_args" must be an object')
  args = {**ARCHITECTURES[name], **model_args}
  if img_size is not None:
    args['img_size'] = int(img_size)
  return name, config_from_timm_args(args, path), raw


def _norm_stats(raw: Mapping[str, Any], key: str, path: str) -> tuple[float, float, float]:
  value = (raw.get('pretrained_cfg') or {}).get(key)
  if value is None:
    raise weights.CheckpointError(
        f'{path}: pretrained_cfg has no "{key}" (the image normalisation)')
  if len(value) != 3:
    raise weights.CheckpointError(f'{path}: pretrained_cfg "{key}" must have 3 values')
  return tuple(float(v) for v in value)


def load_vit(folder: str, img_size: Optional[int] = None,
             dtype=jnp.float32) -> LoadedViT:
  """Loads a timm ViT directory (config.json + model.safetensors) without torch.

  Args:
    folder: the directory (see the module docstring).
    img_size: image side to run at; default the checkpoint's. A different patch grid
      than the checkpoint's resamples the position embedding as timm does.
    dtype: dtype of the floating parameters.

  Returns:
    The LoadedViT.

  Raises:
    weights.CheckpointError: a missing directory or file, an unknown architecture, or
      weights that do not fit the config.
  """
  folder = os.fspath(folder)
  if not os.path.isdir(folder):
    raise weights.CheckpointError(f'ViT directory {folder} does not exist')
  name, config, raw = read_timm_config(folder, img_size)
  cfg_path = os.path.join(folder, CONFIG_FILE)
  mean, std = _norm_stats(raw, 'mean', cfg_path), _norm_stats(raw, 'std', cfg_path)
  path = os.path.join(folder, WEIGHTS_FILE)
  if not os.path.isfile(path):
    hint = (' (pickle weights: convert them to safetensors)' if os.path.isfile(
        os.path.join(folder, 'pytorch_model.bin')) else '')
    raise weights.CheckpointError(f'missing weights file {path}{hint}')
  try:
    state = safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own SafetensorError on bad files
    raise weights.CheckpointError(f'cannot read safetensors file {path}: {e}') from None
  if 'pos_embed' not in state:
    raise weights.CheckpointError(f'{path} has no pos_embed: not a timm ViT checkpoint')
  extra = 0 if config.no_embed_class else config.num_prefix_tokens
  ckpt_grid = math.isqrt(max(state['pos_embed'].shape[1] - extra, 0))
  params = params_from_timm_state(state, config, path, dtype)
  return LoadedViT(architecture=name, config=config, params=params, mean=mean, std=std,
                   checkpoint_grid=ckpt_grid)
