"""Stable Diffusion 1.x / 2.x / XL UNet with RealCustom's visual cross-attention.

Our own linen module because diffusers' Flax UNet cannot be extended from outside (no
attention processors, attention modules built inside its setup). Its parameter tree has
exactly the names and shapes of diffusers' `FlaxUNet2DConditionModel` (0.39.0) plus
`to_k_visual` / `to_v_visual` in every `attn2`, so real SD checkpoints load unchanged and
diffusers' model can check ours (tests).
SDXL adds `add_embedding` (the 'text_time' added conditioning) and deeper transformers
per block, both named as in diffusers.

Layout: latents come in and go out NCHW, as in diffusers; everything inside is NHWC.
"""
import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from realcustom_jax.attention import Attention

Array = jax.Array

# 'torch': the numerics SD checkpoints were trained with (PyTorch: exact erf GELU in
# GEGLU, GroupNorm eps 1e-6 in Transformer2DModel). 'diffusers_flax': diffusers' Flax
# UNet (tanh GELU, eps 1e-5), kept so that model can check ours exactly.
NUMERICS = ('torch', 'diffusers_flax')

_SUPPORTED_DOWN = ('CrossAttnDownBlock2D', 'DownBlock2D')
_SUPPORTED_UP = ('CrossAttnUpBlock2D', 'UpBlock2D')


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float) -> Array:
  """Sinusoidal timestep features, as diffusers' `get_sinusoidal_embeddings`."""
  half = dim // 2
  exponent = -math.log(10000.0) / (half - freq_shift)
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * exponent)
  angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def text_time_features(text_embeds: Array, time_ids: Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float) -> Array:
  """SDXL's added-conditioning input (diffusers' addition_embed_type='text_time').

  Each micro-condition (original size, crop corner, target size: 6 numbers) gets its own
  sinusoidal `dim`-wide embedding; they are flattened per sample and appended to the
  pooled text embedding. `add_embedding` (an MLP like `time_embedding`) maps the result
  to the timestep embedding's width, and the UNet adds it there.

  Args:
    text_embeds: (B, P) pooled text embedding.
    time_ids: (B, n) micro-conditions.
    dim: addition_time_embed_dim.
    flip_sin_to_cos: as the UNet's timestep embedding.
    freq_shift: as the UNet's timestep embedding.

  Returns:
    (B, P + n * dim) float32 features.
  """
  b = text_embeds.shape[0]
  time_embeds = timestep_embedding(time_ids.reshape(-1), dim, flip_sin_to_cos, freq_shift)
  return jnp.concatenate(
      [text_embeds.astype(jnp.float32), time_embeds.reshape(b, -1)], axis=-1)


class ResnetBlock(nn.Module):
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    conv = lambda name: nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)),
                                dtype=self.dtype, name=name)
    h = nn.swish(nn.GroupNorm(num_groups=32, epsilon=1e-5, name='norm1')(x))
    h = conv('conv1')(h)
    h = h + nn.Dense(self.out_channels, dtype=self.dtype,
                     name='time_emb_proj')(nn.swish(temb))[:, None, None, :]
    h = nn.swish(nn.GroupNorm(num_groups=32, epsilon=1e-5, name='norm2')(h))
    h = conv('conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = nn.Conv(self.out_channels, (1, 1), padding='VALID', dtype=self.dtype,
                  name='conv_shortcut')(x)
    return h + x


class FeedForward(nn.Module):
  """GEGLU feed-forward (`net_0` = proj to 2 x 4 dim, `net_2` back), diffusers' names."""
  dim: int
  exact_gelu: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    # Module nesting reproduces diffusers' names: ff/net_0/proj, ff/net_2.
    h = _GegluProj(self.dim * 4, self.exact_gelu, self.dtype, name='net_0')(x)
    return nn.Dense(self.dim, dtype=self.dtype, name='net_2')(h)


class _GegluProj(nn.Module):
  inner: int
  exact_gelu: bool
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = nn.Dense(self.inner * 2, dtype=self.dtype, name='proj')(x)
    linear, gate = jnp.split(h, 2, axis=-1)
    # Torch's GEGLU (what SD was trained with) uses the exact erf GELU; diffusers' Flax
    # port uses flax's tanh approximation.
    return linear * nn.gelu(gate, approximate=not self.exact_gelu)


class TransformerBlock(nn.Module):
  dim: int
  heads: int
  dim_head: int
  only_cross_attention: bool = False
  attention_impl: str = 'xla'
  mask_antialias: bool = False
  exact_gelu: bool = True
  dtype: jnp.dtype = jnp.float32
  fused_word_maps: bool = True

  @nn.compact
  def __call__(self, x: Array, context: Array, spatial: tuple[int, int],
               visual: Mapping[str, Any]) -> Array:
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name, cross: Attention(
        self.dim, self.heads, self.dim_head, is_cross=cross,
        attention_impl=self.attention_impl, mask_antialias=self.mask_antialias,
        fused_word_maps=self.fused_word_maps, dtype=self.dtype, name=name)
    h = norm('norm1')(x)
    if self.only_cross_attention:
      x = x + attn('attn1', False)(h, context)
    else:
      x = x + attn('attn1', False)(h)
    x = x + attn('attn2', True)(norm('norm2')(x), context, spatial=spatial, **visual)
    return x + FeedForward(self.dim, self.exact_gelu, self.dtype, name='ff')(norm('norm3')(x))


# config.model.remat: what each transformer block keeps for the backward pass. 'full'
# recomputes the whole block; 'dots' keeps the outputs of its matmuls without batch
# dimensions (the projections and the feed-forward: costly to recompute, a few
# (B, N, C) tensors to keep) and recomputes the norms, activations and attention (a fused
# kernel recomputes its scores anyway). 'none' (or False) keeps everything.
REMAT_POLICIES = {'full': None, 'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_policy(remat: Any) -> Optional[str]:
  """None (no remat) or a REMAT_POLICIES key, from a policy name or a bool (True = 'full').

  Raises:
    ValueError: for anything else.
  """
  if remat is False or remat == 'none':
    return None
  if remat is True:
    return 'full'
  if isinstance(remat, str) and remat in REMAT_POLICIES:
    return remat
  raise ValueError(f"remat must be True, False, 'none' or one of {tuple(REMAT_POLICIES)}, "
                   f'got {remat!r}')


class Transformer2D(nn.Module):
  channels: int
  heads: int
  depth: int = 1
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  attention_impl: str = 'xla'
  mask_antialias: bool = False
  remat: Any = False  # see REMAT_POLICIES
  numerics: str = 'torch'
  dtype: jnp.dtype = jnp.float32
  fused_word_maps: bool = True

  @nn.compact
  def __call__(self, x: Array, context: Array, visual: Mapping[str, Any]) -> Array:
    b, h, w, c = x.shape
    residual = x
    # Torch's Transformer2DModel hard-codes eps 1e-6 here (the resnets use 1e-5).
    eps = 1e-6 if self.numerics == 'torch' else 1e-5
    x = nn.GroupNorm(num_groups=32, epsilon=eps, name='norm')(x)
    proj = lambda name: (nn.Dense(c, dtype=self.dtype, name=name) if self.use_linear_projection
                         else nn.Conv(c, (1, 1), padding='VALID', dtype=self.dtype, name=name))
    if self.use_linear_projection:
      x = proj('proj_in')(x.reshape(b, h * w, c))
    else:
      x = proj('proj_in')(x).reshape(b, h * w, c)
    policy = remat_policy(self.remat)
    block_cls = (TransformerBlock if policy is None else
                 nn.remat(TransformerBlock, static_argnums=(3,), policy=REMAT_POLICIES[policy]))
    for i in range(self.depth):
      x = block_cls(c, self.heads, c // self.heads, self.only_cross_attention,
                    self.attention_impl, self.mask_antialias, self.numerics == 'torch',
                    self.dtype, fused_word_maps=self.fused_word_maps,
                    name=f'transformer_blocks_{i}')(x, context, (h, w), visual)
    if self.use_linear_projection:
      x = proj('proj_out')(x).reshape(b, h, w, c)
    else:
      x = proj('proj_out')(x.reshape(b, h, w, c))
    return x + residual


class TimeEmbedding(nn.Module):
  dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.silu(nn.Dense(self.dim, dtype=self.dtype, name='linear_1')(x))
    return nn.Dense(self.dim, dtype=self.dtype, name='linear_2')(x)


@dataclasses.dataclass(frozen=True)
class _AttnSettings:
  """What every Transformer2D of the UNet shares (hashable, passed to the blocks)."""
  use_linear_projection: bool
  attention_impl: str
  mask_antialias: bool
  remat: Any
  numerics: str
  fused_word_maps: bool


class DownBlock(nn.Module):
  """diffusers' (CrossAttn)DownBlock2D: resnets_j [+ attentions_j], downsamplers_0."""
  channels: int
  num_layers: int
  heads: int  # 0: no attention (DownBlock2D)
  depth: int
  only_cross_attention: bool
  add_downsample: bool
  settings: _AttnSettings
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, visual):
    skips = []
    for j in range(self.num_layers):
      x = ResnetBlock(self.channels, self.dtype, name=f'resnets_{j}')(x, temb)
      if self.heads:
        x = _transformer(self, f'attentions_{j}')(x, context, visual)
      skips.append(x)
    if self.add_downsample:
      x = _Downsample(self.channels, self.dtype, name='downsamplers_0')(x)
      skips.append(x)
    return x, skips


class UpBlock(nn.Module):
  """diffusers' (CrossAttn)UpBlock2D: resnets_j [+ attentions_j], upsamplers_0."""
  channels: int
  num_layers: int
  heads: int
  depth: int
  only_cross_attention: bool
  add_upsample: bool
  settings: _AttnSettings
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, skips, temb, context, visual):
    for j in range(self.num_layers):
      x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
      x = ResnetBlock(self.channels, self.dtype, name=f'resnets_{j}')(x, temb)
      if self.heads:
        x = _transformer(self, f'attentions_{j}')(x, context, visual)
    if self.add_upsample:
      x = _Upsample(self.channels, self.dtype, name='upsamplers_0')(x)
    return x


class MidBlock(nn.Module):
  """diffusers' UNetMidBlock2DCrossAttn: resnets_0, attentions_0, resnets_1."""
  channels: int
  heads: int
  depth: int
  settings: _AttnSettings
  only_cross_attention: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, visual):
    x = ResnetBlock(self.channels, self.dtype, name='resnets_0')(x, temb)
    x = _transformer(self, 'attentions_0')(x, context, visual)
    return ResnetBlock(self.channels, self.dtype, name='resnets_1')(x, temb)


def _transformer(block, name: str) -> Transformer2D:
  s = block.settings
  return Transformer2D(block.channels, block.heads, block.depth, s.use_linear_projection,
                       block.only_cross_attention, s.attention_impl, s.mask_antialias,
                       s.remat, s.numerics, block.dtype,
                       fused_word_maps=s.fused_word_maps, name=name)


class _Downsample(nn.Module):
  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
                   dtype=self.dtype, name='conv')(x)


class _Upsample(nn.Module):
  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method='nearest')
    return nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                   name='conv')(x)


# Config values that change the architecture in ways this UNet does not implement: each
# key must be absent or hold diffusers' default.
_REQUIRED_DEFAULTS = dict(
    class_embed_type=None, num_class_embeds=None, class_embeddings_concat=False,
    encoder_hid_dim=None, encoder_hid_dim_type=None, time_cond_proj_dim=None,
    time_embedding_type='positional', time_embedding_dim=None, time_embedding_act_fn=None,
    timestep_post_act=None, resnet_time_scale_shift='default', resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, act_fn='silu', norm_num_groups=32, norm_eps=1e-5,
    conv_in_kernel=3, conv_out_kernel=3, center_input_sample=False, downsample_padding=1,
    mid_block_scale_factor=1, dual_cross_attention=False, cross_attention_norm=None,
    attention_type='default', mid_block_only_cross_attention=None,
    reverse_transformer_layers_per_block=None,
    # diffusers itself refuses it (attention_head_dim holds the head counts).
    num_attention_heads=None,
)
_ADDITION_EMBED_TYPES = (None, 'text_time')


def check_config(config: Mapping[str, Any]) -> None:
  """Raises ValueError (one line) for a diffusers UNet config this UNet cannot build."""
  for key, default in _REQUIRED_DEFAULTS.items():
    if config.get(key, default) != default:
      raise ValueError(f'unsupported UNet config: {key}={config[key]!r} (only '
                       f'{default!r} is implemented)')
  kind = config.get('addition_embed_type')
  if kind not in _ADDITION_EMBED_TYPES:
    raise ValueError(f'unsupported UNet config: addition_embed_type={kind!r} (only None '
                     "and SDXL's 'text_time' are implemented)")
  if kind == 'text_time':
    for key in ('addition_time_embed_dim', 'projection_class_embeddings_input_dim'):
      if not isinstance(config.get(key), int):
        raise ValueError(f"UNet config with addition_embed_type='text_time' needs an "
                         f'integer {key}, got {config.get(key)!r}')
  for key in ('transformer_layers_per_block', 'attention_head_dim'):
    value = config.get(key)
    if isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in value):
      raise ValueError(f'unsupported UNet config: per-layer {key}={value!r}')
  if isinstance(config.get('cross_attention_dim'), (list, tuple)):
    raise ValueError('unsupported UNet config: per-block cross_attention_dim '
                     f'{config["cross_attention_dim"]!r}')
  for key, allowed in (('down_block_types', _SUPPORTED_DOWN), ('up_block_types', _SUPPORTED_UP)):
    for block in config.get(key, ()):
      if block not in allowed:
        raise ValueError(f'unsupported UNet block {block!r} in {key}')
  mid = config.get('mid_block_type', 'UNetMidBlock2DCrossAttn')
  if mid != 'UNetMidBlock2DCrossAttn':
    raise ValueError(f'unsupported UNet mid_block_type {mid!r}')


def _freeze(value):
  """Lists from JSON configs become tuples so the module stays hashable."""
  return tuple(value) if isinstance(value, (list, tuple)) else value


class RealCustomUNet(nn.Module):
  """SD 1.x/2.x/XL UNet (diffusers' config fields) with a visual branch in every attn2.

  Construct it from a diffusers `unet/config.json` dict with `from_config`.
  """
  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  down_block_types: Sequence[str] = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
  up_block_types: Sequence[str] = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  only_cross_attention: Any = False
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  # diffusers' naming quirk: this is the number of HEADS per block, for SD and SDXL alike
  # (SDXL's (5, 10, 20) are 64-wide heads over 320/640/1280 channels).
  attention_head_dim: Any = 8
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  # Transformer blocks per Transformer2D, per down block; the up blocks mirror it and the
  # mid block takes the last (SDXL: (1, 2, 10)).
  transformer_layers_per_block: Any = 1
  # SDXL's added conditioning: None or 'text_time' (see `text_time_features`).
  addition_embed_type: Optional[str] = None
  addition_time_embed_dim: Optional[int] = None
  projection_class_embeddings_input_dim: Optional[int] = None
  attention_impl: str = 'xla'
  mask_antialias: bool = False
  remat: Any = False  # see REMAT_POLICIES
  numerics: str = 'torch'  # see NUMERICS
  dtype: jnp.dtype = jnp.float32
  # The T2I word maps out of the fused text kernel (`kernels.fused_attention_with_word_maps`);
  # False: their rows' probabilities through XLA beside it (benchmarks.sampling's
  # --nofused_word_maps). No effect with XLA attention.
  fused_word_maps: bool = True

  @classmethod
  def from_config(cls, config: Mapping[str, Any], **overrides) -> 'RealCustomUNet':
    """Builds the UNet from a diffusers UNet config dict; unknown keys are ignored.

    Raises:
      ValueError: for architectures this UNet does not implement (class embeddings,
        added embeddings other than SDXL's 'text_time', other block types, non-default
        norms/activations/time embeddings, asymmetric transformer depths).
    """
    config = dict(config)
    check_config(config)
    fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    kwargs = {k: _freeze(v) for k, v in config.items() if k in fields}
    kwargs.update(overrides)
    return cls(**kwargs)

  @property
  def has_added_cond(self) -> bool:
    """Whether calls need `added_cond` (SDXL's pooled text + size/crop time ids)."""
    return self.addition_embed_type is not None

  def _per_block(self, value) -> tuple:
    n = len(self.down_block_types)
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n

  @property
  def num_cross_attention_layers(self) -> int:
    """How many attn2 layers (each with a visual K/V pair) the UNet has."""
    depth = self._per_block(self.transformer_layers_per_block)
    down = sum(self.layers_per_block * depth[i]
               for i, t in enumerate(self.down_block_types) if t.startswith('CrossAttn'))
    up = sum((self.layers_per_block + 1) * depth[::-1][i]
             for i, t in enumerate(self.up_block_types) if t.startswith('CrossAttn'))
    return down + up + depth[-1]

  def word_map_size(self, height: int, width: int) -> tuple[int, int]:
    """(h, w) of the largest cross-attention map for (height, width) latents.

    The size of the influence scope (Eq. 11), known without tracing the UNet.
    """
    n = len(self.block_out_channels)
    levels = [i for i, t in enumerate(self.down_block_types) if t == 'CrossAttnDownBlock2D']
    levels += [n - 1 - i for i, t in enumerate(self.up_block_types)
               if t == 'CrossAttnUpBlock2D']
    for _ in range(min(levels + [n - 1])):  # n - 1: the mid block
      height, width = (height + 1) // 2, (width + 1) // 2  # stride-2, pad-1 convs
    return height, width

  def _check_added_cond(self, added_cond, batch: int) -> tuple[Array, Array]:
    """(text_embeds (B, P), time_ids (B, n)) from `added_cond`, or a clear ValueError."""
    if self.addition_embed_type not in _ADDITION_EMBED_TYPES:
      raise ValueError(f'unsupported addition_embed_type={self.addition_embed_type!r}')
    want = "added_cond={'text_embeds': (B, P), 'time_ids': (B, n)}"
    if added_cond is None or set(added_cond) != {'text_embeds', 'time_ids'}:
      got = None if added_cond is None else sorted(added_cond)
      raise ValueError(f"this UNet has addition_embed_type='text_time' (SDXL): pass "
                       f'{want}, got {got}')
    text_embeds = jnp.asarray(added_cond['text_embeds'])
    time_ids = jnp.asarray(added_cond['time_ids'])
    width = text_embeds.shape[-1] + time_ids.shape[-1] * self.addition_time_embed_dim
    if (text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != batch
        or time_ids.shape[0] != batch or width != self.projection_class_embeddings_input_dim):
      raise ValueError(
          f'{want} with B={batch} and P + n * {self.addition_time_embed_dim} = '
          f'{self.projection_class_embeddings_input_dim}, got text_embeds '
          f'{text_embeds.shape} and time_ids {time_ids.shape}')
    return text_embeds, time_ids

  @nn.compact
  def __call__(self, sample: Array, timesteps: Array, encoder_hidden_states: Array, *,
               visual_tokens: Optional[Array] = None,
               visual_token_mask: Optional[Array] = None,
               scope_mask: Optional[Array] = None,
               word_weights: Optional[Array] = None,
               added_cond: Optional[Mapping[str, Array]] = None) -> Array:
    """Predicts the noise.

    Args:
      sample: (B, C, H, W) latents z_t.
      timesteps: (B,) or scalar timesteps.
      encoder_hidden_states: (B, Nt, c_t) text features f_ct.
      visual_tokens: (B, Ni, c_t) projected visual condition; None turns the visual
        branch off (the T2I and unconditional branches).
      visual_token_mask: (B, Ni) bool, the tokens kept by Eq. 10's top-k; or float 0 / 1
        weights with a straight-through gradient (training with
        config.train.selection_gradient, see `attention.visual_cross_attention`).
      scope_mask: (B, H0, W0) influence scope (Eq. 11) gating the visual output (Eq. 12).
      word_weights: (B, Nt) token weights of the target word, or (B_w, Nt) for the last
        B_w rows only; when given, every attn2 sows its word map into the
        'intermediates' collection (see `model.word_maps`).
      added_cond: SDXL only (required there, refused elsewhere): {'text_embeds': (B, P)
        pooled text embedding, 'time_ids': (B, n) size/crop micro-conditions},
        diffusers' `added_cond_kwargs`.

    Returns:
      (B, C, H, W) predicted noise.

    Raises:
      ValueError: `added_cond` missing for an SDXL UNet, given to another one, or of
        widths that do not add up to projection_class_embeddings_input_dim.
    """
    heads = self._per_block(self.attention_head_dim)
    depth = self._per_block(self.transformer_layers_per_block)
    only_cross = self._per_block(self.only_cross_attention)
    channels = tuple(self.block_out_channels)
    n = len(channels)
    if self.numerics not in NUMERICS:
      raise ValueError(f'numerics must be one of {NUMERICS}, got {self.numerics!r}')
    settings = _AttnSettings(self.use_linear_projection, self.attention_impl,
                             self.mask_antialias, self.remat, self.numerics,
                             self.fused_word_maps)
    visual = dict(visual_tokens=visual_tokens, visual_token_mask=visual_token_mask,
                  scope_mask=scope_mask, word_weights=word_weights)
    context = encoder_hidden_states.astype(self.dtype)

    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim == 0:
      timesteps = jnp.broadcast_to(timesteps, (sample.shape[0],))
    temb = timestep_embedding(timesteps, channels[0], self.flip_sin_to_cos, self.freq_shift)
    temb = TimeEmbedding(channels[0] * 4, self.dtype, name='time_embedding')(temb)
    if self.has_added_cond:
      features = text_time_features(*self._check_added_cond(added_cond, sample.shape[0]),
                                    self.addition_time_embed_dim, self.flip_sin_to_cos,
                                    self.freq_shift)
      temb = temb + TimeEmbedding(channels[0] * 4, self.dtype, name='add_embedding')(features)
    elif added_cond is not None:
      raise ValueError('added_cond was given, but this UNet has no added conditioning '
                       '(addition_embed_type is None: an SD 1.x/2.x config)')

    x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
    x = nn.Conv(channels[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name='conv_in')(x)
    skips = [x]
    for i, block_type in enumerate(self.down_block_types):
      has_attn = block_type == 'CrossAttnDownBlock2D'
      x, block_skips = DownBlock(
          channels[i], self.layers_per_block, heads[i] if has_attn else 0, depth[i],
          only_cross[i], i < n - 1, settings, self.dtype, name=f'down_blocks_{i}')(
              x, temb, context, visual)
      skips += block_skips

    x = MidBlock(channels[-1], heads[-1], depth[-1], settings, dtype=self.dtype,
                 name='mid_block')(x, temb, context, visual)

    rev = lambda t: tuple(reversed(t))
    for i, block_type in enumerate(self.up_block_types):
      has_attn = block_type == 'CrossAttnUpBlock2D'
      k = self.layers_per_block + 1
      block_skips, skips = skips[-k:], skips[:-k]
      x = UpBlock(rev(channels)[i], k, rev(heads)[i] if has_attn else 0, rev(depth)[i],
                  rev(only_cross)[i], i < n - 1, settings, self.dtype,
                  name=f'up_blocks_{i}')(x, block_skips, temb, context, visual)

    x = nn.swish(nn.GroupNorm(num_groups=32, epsilon=1e-5, name='conv_norm_out')(x))
    x = nn.Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name='conv_out')(x)
    return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)
