"""The DreamBench protocol's DINO ViT (transformers' `ViTModel`, e.g. facebook/dino-vits16)
in Flax, the project's own (transformers 5 has no Flax).

transformers' ViT is CLIP's vision tower with three differences, so it runs on the
blocks of `realcustom_jax.clip` (same pre-LN layer, same q/k/v/out and fc1/fc2):

  [CLS; patches (conv WITH bias)] + position embeddings -> L pre-LN blocks -> final LN
  (no LayerNorm before the blocks; `last_hidden_state` is the final-LN'd sequence)

DINO-I (`metrics.dino_i`) reads the class token of `last_hidden_state`. Weights load from
the transformers layout (`model.safetensors` in torch names, or `flax_model.msgpack` in
transformers' Flax names) torch-free; the pooler, which DINO-I does not use, is skipped.
"""
from typing import Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax import clip

Array = jax.Array


class ViTModel(clip.Part):
  """transformers' ViTModel without pooler, on (B, S, S, 3) normalised pixels (NHWC).

  `config` is a `clip.CLIPConfig` of the ViT's sizes (hidden_act 'gelu', the checkpoint's
  layer_norm_eps); returns the (B, 1 + N, c) final-LN'd states.
  """

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    c = self.config
    p = c.patch_size
    patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding='VALID',
                      dtype=self.dtype, name='patch_embedding')(pixels)
    patches = patches.reshape(patches.shape[0], -1, c.hidden_size)
    init = nn.initializers.normal(0.02)
    cls = self.param('cls_token', init, (1, 1, c.hidden_size)).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (patches.shape[0], 1, c.hidden_size)),
                         patches], axis=1)
    x = x + self.param('position_embeddings', init,
                       (1, x.shape[1], c.hidden_size)).astype(self.dtype)
    x = clip.Encoder(c, self.dtype, name='encoder')(x, causal=False)[-1]
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=self.dtype, name='layernorm')(x)


def config_from_dict(raw: Mapping) -> clip.CLIPConfig:
  """A transformers ViTConfig dict (config.json) as the tower config."""
  return clip.CLIPConfig.from_dict(dict(raw, hidden_act=raw.get('hidden_act', 'gelu'),
                                        layer_norm_eps=raw.get('layer_norm_eps', 1e-12)))


# transformers' names inside one layer -> ours (clip.EncoderLayer's).
_LAYER = {('attention', 'attention', 'query'): ('self_attn', 'q_proj'),
          ('attention', 'attention', 'key'): ('self_attn', 'k_proj'),
          ('attention', 'attention', 'value'): ('self_attn', 'v_proj'),
          ('attention', 'output', 'dense'): ('self_attn', 'out_proj'),
          ('intermediate', 'dense'): ('mlp', 'fc1'),
          ('output', 'dense'): ('mlp', 'fc2'),
          ('layernorm_before',): ('layer_norm1',),
          ('layernorm_after',): ('layer_norm2',)}


def _ours(path: tuple[str, ...]) -> tuple[str, ...] | None:
  """A transformers ViT path (torch names split at '.', or the Flax tree's) -> ours,
  without its leaf name; None for what we do not load (the pooler)."""
  if path and path[0] == 'vit':  # a ViTFor...'s trunk
    path = path[1:]
  if path[:2] == ('embeddings', 'patch_embeddings'):
    return ('patch_embedding',)
  if path[:1] == ('embeddings',):
    return ()
  if path[:1] == ('layernorm',):
    return ('layernorm',)
  if path[:2] == ('encoder', 'layer') and len(path) > 2 and path[2].isdigit():
    inner = tuple(p for p in path[3:])
    for theirs, mine in _LAYER.items():
      if inner[:len(theirs)] == theirs:
        return ('encoder', f'layers_{path[2]}') + mine
  return None


def params_from_state(flat: Mapping[tuple[str, ...], np.ndarray], torch_layout: bool,
                      shapes: Mapping) -> dict:
  """transformers' ViT weights (flat paths -> arrays) as our tree.

  Args:
    flat: torch state dict keys split at '.' (`torch_layout`), or the flattened Flax tree.
    torch_layout: Linear weights (out, in) and conv OIHW, to be transposed.
    shapes: our tree's shapes (`clip.param_shapes`, which builds any `clip.Part` tower).

  Raises:
    ValueError: a parameter missing or misshapen (one line).
  """
  got = {}
  for path, value in flat.items():
    module = _ours(tuple(path[:-1]))
    if module is None:
      continue
    leaf, value = path[-1], np.asarray(value)
    if module == ():  # cls_token / position_embeddings
      got[(leaf,)] = value
      continue
    if leaf == 'weight':
      if 'norm' in module[-1]:
        leaf = 'scale'
      elif module == ('patch_embedding',):
        leaf, value = 'kernel', value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      else:
        leaf, value = 'kernel', value.T
    got[module + (leaf,)] = value
  return clip.checked_params(got, 'DINO', shapes)


def params_from_torch_state(state: Mapping[str, np.ndarray], shapes: Mapping) -> dict:
  return params_from_state({tuple(k.split('.')): v for k, v in state.items()}, True, shapes)


def params_from_flax_layout(tree: Mapping, shapes: Mapping) -> dict:
  flat = traverse_util.flatten_dict(dict(tree))
  return params_from_state({tuple(str(p) for p in k): v for k, v in flat.items()}, False,
                           shapes)
