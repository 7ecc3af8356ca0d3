"""CLIP's text and vision towers in Flax, the project's own (transformers 5 has no Flax).

The modules follow transformers' `CLIPTextModel(WithProjection)` and
`CLIPVisionModel(WithProjection)` layer for layer, in float32 unless asked otherwise:

  text:   token + position embeddings -> L pre-LN blocks with a causal mask -> final LN;
          pooled = the final-LN state at the end token; text_embeds = pooled @ projection
  vision: [class; patches (conv, no bias)] + positions -> pre-LN -> L pre-LN blocks;
          pooled = post-LN(class state); image_embeds = pooled @ projection

`hidden_states` holds the embeddings and every block's output before the final
LayerNorm, as transformers' `output_hidden_states=True` (SD 2.x and SDXL read the
penultimate). Parameter names mirror the torch state dict (`params_from_torch_state`
maps one onto the other: Linear weights transposed, LayerNorm weight -> scale), so a
transformers directory (`config.json` + `model.safetensors`) loads torch-free
(`loading.weights.load_clip_text` / `load_clip_vision`).
"""
import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    'quick_gelu': quick_gelu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # transformers' 'gelu': erf
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """One tower's sizes (the keys of transformers' CLIPTextConfig / CLIPVisionConfig)."""
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  projection_dim: Optional[int] = None  # the *WithProjection head; None: none
  # Text only.
  vocab_size: int = 49408
  max_position_embeddings: int = 77
  eos_token_id: int = 2
  # Vision only.
  image_size: int = 224
  patch_size: int = 32
  num_channels: int = 3

  @classmethod
  def from_dict(cls, raw: Any, with_projection: bool = False) -> 'CLIPConfig':
    """From a config.json dict (a CLIPModel's nested text_config / vision_config too) or a
    transformers config object (CLIPTextConfig, CLIPVisionConfig, ViTConfig)."""
    raw = raw.to_dict() if hasattr(raw, 'to_dict') else raw
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in raw.items() if k in names}
    kwargs['projection_dim'] = raw.get('projection_dim') if with_projection else None
    if kwargs.get('hidden_act', 'quick_gelu') not in ACTIVATIONS:
      raise ValueError(f'hidden_act {kwargs["hidden_act"]!r} is not supported, expected one '
                       f'of {sorted(ACTIVATIONS)}')
    return cls(**kwargs)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# Random towers (the tiny test models, the toy world's) start as transformers' do.
_INIT = nn.initializers.normal(0.02)


class Part(nn.Module):
  """A module of the towers: built from the config, computing in `dtype`."""
  config: CLIPConfig
  dtype: Any = jnp.float32


class Attention(Part):
  """Multi-head self-attention with q/k/v/out projections (biases), scale head_dim**-0.5."""

  @nn.compact
  def __call__(self, x: Array, causal: bool) -> Array:
    c = self.config
    heads, width = c.num_attention_heads, c.hidden_size
    head_dim = width // heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, kernel_init=_INIT, name=name)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
    q, k, v = (split(dense(n)(x)) for n in ('q_proj', 'k_proj', 'v_proj'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * head_dim ** -0.5
    if causal:
      n = x.shape[1]
      logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(x.shape[:2] + (width,))
    return dense('out_proj')(out)


class MLP(Part):
  """fc2(act(fc1 x))."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    h = nn.Dense(c.intermediate_size, dtype=self.dtype, kernel_init=_INIT, name='fc1')(x)
    return nn.Dense(c.hidden_size, dtype=self.dtype, kernel_init=_INIT,
                    name='fc2')(ACTIVATIONS[c.hidden_act](h))


class EncoderLayer(Part):
  """x + attn(LN1 x), then x + MLP(LN2 x)."""

  @nn.compact
  def __call__(self, x: Array, causal: bool) -> Array:
    c = self.config
    norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
    x = x + Attention(c, self.dtype, name='self_attn')(norm('layer_norm1')(x), causal)
    return x + MLP(c, self.dtype, name='mlp')(norm('layer_norm2')(x))


class Encoder(Part):
  """The block stack; returns (embeddings, block 1, ..., block L) states."""

  @nn.compact
  def __call__(self, x: Array, causal: bool) -> tuple[Array, ...]:
    states = [x]
    for i in range(self.config.num_hidden_layers):
      x = EncoderLayer(self.config, self.dtype, name=f'layers_{i}')(x, causal)
      states.append(x)
    return tuple(states)


@dataclasses.dataclass(frozen=True)
class TowerOutput:
  """What a tower gives.

  Attributes:
    last_hidden_state: text: (B, L, c) after the final LayerNorm; vision: (B, 1 + N, c)
      the last block's output (no post-LN).
    hidden_states: the L + 1 states before it, embeddings first (vision: pre-LN'd).
    pooled: (B, c) text: the final-LN state at the end token; vision: the post-LN class
      state.
    embeds: (B, p) the pooled state projected (text_embeds / image_embeds), or None
      without a projection.
  """
  last_hidden_state: Array
  hidden_states: tuple[Array, ...]
  pooled: Array
  embeds: Optional[Array]


def _projected(config: CLIPConfig, pooled: Array, name: str, dtype) -> Optional[Array]:
  if not config.projection_dim:
    return None
  return nn.Dense(config.projection_dim, use_bias=False, dtype=dtype, kernel_init=_INIT,
                  name=name)(pooled)


class CLIPTextModel(Part):
  """CLIP's text tower (causal), with the projection when config.projection_dim is set."""

  @nn.compact
  def __call__(self, input_ids: Array) -> TowerOutput:
    c = self.config
    n = input_ids.shape[-1]
    tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, embedding_init=_INIT,
                      name='token_embedding')
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                         embedding_init=_INIT, name='position_embedding')
    x = tokens(input_ids) + positions(jnp.arange(n))[None]
    states = Encoder(c, self.dtype, name='encoder')(x, causal=True)
    last = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype,
                        name='final_layer_norm')(states[-1])
    if c.eos_token_id == 2:  # configs from before transformers' PR 24773: the largest id
      end = jnp.argmax(input_ids, axis=-1)
    else:  # the first end token (padding may repeat it)
      end = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
    pooled = last[jnp.arange(last.shape[0]), end]
    return TowerOutput(last, states, pooled,
                       _projected(c, pooled, 'text_projection', self.dtype))


class CLIPVisionModel(Part):
  """CLIP's vision tower on (B, H, W, 3) normalised pixels (NHWC)."""

  @nn.compact
  def __call__(self, pixels: Array) -> TowerOutput:
    c = self.config
    p = c.patch_size
    patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding='VALID',
                      use_bias=False, dtype=self.dtype, kernel_init=_INIT,
                      name='patch_embedding')(pixels)
    patches = patches.reshape(patches.shape[0], -1, c.hidden_size)
    cls = self.param('class_embedding', nn.initializers.normal(0.02), (c.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype),
                                          (patches.shape[0], 1, c.hidden_size)), patches], 1)
    x = x + nn.Embed(x.shape[1], c.hidden_size, dtype=self.dtype, embedding_init=_INIT,
                     name='position_embedding')(jnp.arange(x.shape[1]))[None]
    norm = lambda name: nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name=name)
    states = Encoder(c, self.dtype, name='encoder')(norm('pre_layrnorm')(x), causal=False)
    pooled = norm('post_layernorm')(states[-1][:, 0])
    return TowerOutput(states[-1], states, pooled,
                       _projected(c, pooled, 'visual_projection', self.dtype))


def tower_name(module: nn.Module) -> str:
  """'text' or 'vision'."""
  return 'text' if isinstance(module, CLIPTextModel) else 'vision'


def example_input(module: nn.Module) -> Array:
  """One sample's input: (1, max_position_embeddings) ids for the text tower, (1, S, S, C)
  pixels for any other (the vision tower, `eval.dino.ViTModel`)."""
  c = module.config
  if tower_name(module) == 'text':
    return jnp.zeros((1, c.max_position_embeddings), jnp.int32)
  return jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)


def param_shapes(module: nn.Module) -> dict:
  """The tower's parameter shapes (no computation)."""
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), example_input(module))['params']


def init_params(module: nn.Module, rng: Array) -> dict:
  """A random tower (normal(0.02) weights, as transformers initialises CLIP)."""
  return jax.jit(module.init)(rng, example_input(module))['params']


# ---------------------------------------------------------------------------------
# torch state dict -> the parameter tree
# ---------------------------------------------------------------------------------

_TOWERS = {'text': 'text_model.', 'vision': 'vision_model.'}
_PROJECTIONS = {'text': 'text_projection', 'vision': 'visual_projection'}
# Keys of the torch state dict that hold no parameter of ours.
_BUFFERS = ('position_ids',)


def _flax_path(key: str, tower: str) -> tuple[str, ...]:
  """'text_model.encoder.layers.3.self_attn.q_proj.weight' -> our tree's path."""
  key = key.removeprefix(_TOWERS[tower])
  key = key.replace('embeddings.', '', 1) if key.startswith('embeddings.') else key
  return _joined_layers(key.split('.'))


def _joined_layers(parts) -> tuple[str, ...]:
  """('encoder', 'layers', '3', ...) -> ('encoder', 'layers_3', ...)."""
  out, i = [], 0
  while i < len(parts):
    if parts[i] == 'layers' and i + 1 < len(parts) and parts[i + 1].isdigit():
      out.append(f'layers_{parts[i + 1]}')
      i += 2
      continue
    out.append(parts[i])
    i += 1
  return tuple(out)


def params_from_torch_state(state: Mapping[str, np.ndarray], tower: str,
                            shapes: Mapping) -> dict:
  """transformers' torch state dict (one tower, or a whole CLIPModel) as our tree.

  A single tower's keys may carry its prefix ('text_model.encoder...', as transformers 4
  and the hub's checkpoints write them) or not (transformers 5's `save_pretrained`).

  Args:
    state: name -> array, as `loading.formats.read_torch_state` gives it.
    tower: 'text' or 'vision'.
    shapes: our tree's shapes (`jax.eval_shape` of `init`), to know each leaf's kind.

  Returns:
    The parameter tree (numpy arrays), every leaf of `shapes` filled.

  Raises:
    ValueError: a parameter missing from `state`, or one of another shape.
  """
  if not any(k.startswith(tuple(_TOWERS.values())) for k in state):
    # transformers 5 saves a single tower without its 'text_model.' / 'vision_model.'.
    state = {k if k.startswith(tuple(_PROJECTIONS.values())) else _TOWERS[tower] + k: v
             for k, v in state.items()}
  got = {}
  for key, value in state.items():
    if key.split('.')[-1] in _BUFFERS:
      continue
    on_tower = key.startswith(_TOWERS[tower]) or key.startswith(
        ('text_projection', 'visual_projection'))
    if not on_tower:
      continue
    if key.startswith(('text_projection', 'visual_projection')):
      if (tower == 'text') != key.startswith('text_projection'):
        continue
    path = list(_flax_path(key, tower))
    leaf, value = path[-1], np.asarray(value)
    if leaf == 'weight':
      module = path[-2]
      if module in ('token_embedding', 'position_embedding'):
        path[-1] = 'embedding'
      elif module == 'patch_embedding':
        path[-1], value = 'kernel', value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      elif 'norm' in module or module.endswith('layrnorm'):
        path[-1] = 'scale'
      else:
        path[-1], value = 'kernel', value.T
    got[tuple(path)] = value
  return checked_params(got, tower, shapes)


def checked_params(got: Mapping[tuple[str, ...], np.ndarray], tower: str,
                   shapes: Mapping) -> dict:
  """The leaves of `shapes` taken from `got` (flat paths); ValueError (one line) for a
  missing or misshapen one."""
  out = {}
  for path, shape in traverse_util.flatten_dict(dict(shapes)).items():
    if path not in got:
      raise ValueError(f'the checkpoint lacks {tower} parameter {"/".join(path)}')
    if tuple(got[path].shape) != tuple(shape.shape):
      raise ValueError(f'{tower} parameter {"/".join(path)} has shape '
                       f'{tuple(got[path].shape)}, the config gives {tuple(shape.shape)}')
    out[path] = got[path]
  return traverse_util.unflatten_dict(out)


# ---------------------------------------------------------------------------------
# transformers' Flax layout (flax_model.msgpack) <-> the parameter tree
# ---------------------------------------------------------------------------------

_EMBEDDINGS = ('token_embedding', 'position_embedding', 'patch_embedding', 'class_embedding')


def _from_flax_path(path: tuple[str, ...], tower: str) -> Optional[tuple[str, ...]]:
  """A transformers Flax path -> ours; None for another tower's or a CLIPModel's own."""
  if path[0] == _PROJECTIONS[tower]:
    return path
  if path[0] != _TOWERS[tower][:-1]:
    return None
  rest = list(path[1:])
  if rest and rest[0] == 'embeddings':
    rest = rest[1:]
  return _joined_layers(rest)


def params_from_flax_layout(tree: Mapping, tower: str, shapes: Mapping) -> dict:
  """transformers' Flax CLIP tree (a `flax_model.msgpack` of CLIPTextModel(WithProjection),
  CLIPVisionModel(WithProjection) or CLIPModel) as our tree, checked as
  `params_from_torch_state` checks."""
  got = {}
  for path, value in traverse_util.flatten_dict(dict(tree)).items():
    ours = _from_flax_path(tuple(str(p) for p in path), tower)
    if ours is not None:
      got[ours] = np.asarray(value)
  return checked_params(got, tower, shapes)


def params_to_flax_layout(params: Mapping, tower: str) -> dict:
  """Our tree in transformers' Flax layout (what `flax_model.msgpack` holds): the
  inverse of `params_from_flax_layout`, so files the project writes load in either."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    if path[0] == _PROJECTIONS[tower]:
      out[path] = value
      continue
    head = (_TOWERS[tower][:-1],) + (('embeddings',) if path[0] in _EMBEDDINGS else ())
    expanded = []
    for part in path:
      if part.startswith('layers_') and part[len('layers_'):].isdigit():
        expanded += ['layers', part[len('layers_'):]]
      else:
        expanded.append(part)
    out[head + tuple(expanded)] = value
  return traverse_util.unflatten_dict(out)
