"""The trainable adapter: scoring module, visual projection and every visual K/V.

Everything else (the pretrained UNet) stays frozen. Trees are plain nested dicts keyed
like flax params; paths are tuples of keys.

Two kinds of adapter files exist, told apart by their metadata ('adapter_kind'):
'paper', trained here (scoring, visual_proj, visual K/V), and 'release_highres', the
authors' released RealCustom_highres weights converted by `sample.convert_release`
(subject_projector, visual K/V). Neither loads into the other's model.
"""
from typing import Any, Mapping

import jax
import numpy as np

VISUAL_KV = ('to_k_visual', 'to_v_visual')
# 'subject_projector': the release's projector (model.RealCustom, projector='release_highres').
ADAPTER_MODULES = ('scoring', 'visual_proj', 'subject_projector')

PAPER_KIND = 'paper'
RELEASE_KIND = 'release_highres'
_KINDS = {
    PAPER_KIND: "a paper adapter (trained here; config.model.projector='paper')",
    RELEASE_KIND: ("the authors' released RealCustom_highres adapter (from "
                   "sample.convert_release; config.model.projector='release_highres')"),
}
# The release adapter's layout, written in place of the paper's layout number: a reader
# that knows only layout numbers refuses it (see `check_layout`).
RELEASE_LAYOUT = 'release_highres/1'

# What the adapter's parameters mean, written into checkpoints and exported files.
# Layout 1 applied Eq. 9 to the CLIP tokens *before* the visual projection, whose
# LayerNorm erased it; layout 2 applies it to the projected tokens. The trees have the
# same shapes, so only this number tells them apart.
ADAPTER_LAYOUT = 2
_LAYOUTS = {1: 'Eq. 9 before the visual projection', 2: 'Eq. 9 after the visual projection'}


def check_layout(layout, what: str) -> None:
  """ValueError (one line) unless `layout` is ADAPTER_LAYOUT; None counts as layout 1.

  Args:
    layout: the stored layout number (int or str), None when the file predates it.
    what: the file or directory, for the message.
  """
  if str(layout).startswith(RELEASE_KIND):
    raise ValueError(f'{what} holds {_KINDS[RELEASE_KIND]}; this model needs '
                     f'{_KINDS[PAPER_KIND]}')
  try:
    layout = 1 if layout is None else int(layout)
  except (TypeError, ValueError):
    raise ValueError(f'{what}: unreadable adapter layout {layout!r}') from None
  if layout != ADAPTER_LAYOUT:
    raise ValueError(
        f'{what} holds an adapter of layout {layout} '
        f'({_LAYOUTS.get(layout, "unknown")}); this version needs layout {ADAPTER_LAYOUT} '
        f'({_LAYOUTS[ADAPTER_LAYOUT]}): retrain the adapter')


def check_adapter_metadata(metadata: Mapping[str, str], what: str,
                           kind: str = PAPER_KIND) -> None:
  """ValueError (one line) unless the file's metadata says it is a `kind` adapter of
  the layout this version reads.

  Args:
    metadata: the safetensors metadata (`weights.load_adapter_metadata`); files
      without 'adapter_kind' are paper adapters.
    what: the file, for the message.
    kind: PAPER_KIND or RELEASE_KIND, what the model needs.
  """
  got = metadata.get('adapter_kind', PAPER_KIND)
  if got not in _KINDS:
    raise ValueError(f'{what}: unknown adapter kind {got!r} (known: {", ".join(_KINDS)})')
  if got != kind:
    raise ValueError(f'{what} holds {_KINDS[got]}; this model needs {_KINDS[kind]}')
  if kind == PAPER_KIND:
    check_layout(metadata.get('adapter_layout'), what)
  elif metadata.get('adapter_layout') != RELEASE_LAYOUT:
    raise ValueError(f'{what}: release adapter layout {metadata.get("adapter_layout")!r}, '
                     f'this version reads {RELEASE_LAYOUT!r}: convert the .pth again')


def is_adapter_path(path: tuple[str, ...]) -> bool:
  """True for parameters that train (Sec. 3.2: scoring module and W_Ki, W_Vi)."""
  return path[0] in ADAPTER_MODULES or any(p in VISUAL_KV for p in path)


def _key_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', getattr(k, 'name', k)) for k in path)


def adapter_mask(params) -> Any:
  """A tree of bools, True where the parameter belongs to the adapter (for optax)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_adapter_path(_key_names(p)), params)


def _filter(tree: Mapping, keep, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    path = prefix + (k,)
    if isinstance(v, Mapping):
      sub = _filter(v, keep, path)
      if sub:
        out[k] = sub
    elif keep(path):
      out[k] = v
  return out


def split_params(params: Mapping) -> tuple[dict, dict]:
  """Splits the full tree into (frozen base, trainable adapter) nested dicts."""
  base = _filter(params, lambda p: not is_adapter_path(p))
  adapter = _filter(params, is_adapter_path)
  return base, adapter


def merge_params(base: Mapping, adapter: Mapping) -> dict:
  """Inverse of `split_params`."""
  out = dict(base)
  for k, v in adapter.items():
    out[k] = merge_params(out[k], v) if k in out and isinstance(v, Mapping) else v
  return out


def init_visual_kv_from_text(params: Mapping) -> dict:
  """Starts every visual K/V as a copy of its layer's text to_k / to_v (IP-Adapter).

  At step 0 the visual branch then attends like the text branch would to the projected
  image tokens, a better start than random projections.

  Raises:
    ValueError: if a visual projection's shape differs from its text twin's.
  """
  def visit(tree: Mapping, path=()) -> dict:
    out = {}
    for k, v in tree.items():
      if k in VISUAL_KV and isinstance(v, Mapping):
        text = tree[k.replace('_visual', '')]
        if text['kernel'].shape != v['kernel'].shape:
          raise ValueError(f'{"/".join(path + (k,))}: shape {v["kernel"].shape} differs '
                           f'from the text projection {text["kernel"].shape}')
        # A copy, not an alias: the adapter is donated to the train step while the
        # frozen tree (holding the text kernel) is passed beside it.
        out[k] = {'kernel': text['kernel'].copy()}
      elif isinstance(v, Mapping):
        out[k] = visit(v, path + (k,))
      else:
        out[k] = v
    return out
  return visit(params)


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def expected_adapter_size(unet, image_dim: int, latent_channels: int, text_dim: int,
                          scoring_hidden: int = 0, scoring: str = 'adaptive') -> int:
  """Adapter parameter count from the config, for checks and the README.

  Per attn2: W_Ki and W_Vi, each text_dim x inner (inner = the block's channels).
  Scoring: W_a^t (c_t), W_a^v (c), two MLPs [c_i + ctx] -> hidden -> 1 with biases
  (none with scoring='none').
  Projection: c_i x c_t + bias, LayerNorm scale + bias.
  """
  hidden = scoring_hidden or image_dim
  channels = tuple(unet.block_out_channels)
  n = len(channels)
  depth = unet._per_block(unet.transformer_layers_per_block)
  kv = 0
  for i, t in enumerate(unet.down_block_types):
    if t.startswith('CrossAttn'):
      kv += unet.layers_per_block * depth[i] * 2 * text_dim * channels[i]
  for i, t in enumerate(unet.up_block_types):
    if t.startswith('CrossAttn'):
      kv += (unet.layers_per_block + 1) * depth[n - 1 - i] * 2 * text_dim * channels[n - 1 - i]
  kv += depth[-1] * 2 * text_dim * channels[-1]
  mlp = lambda ctx: (image_dim + ctx) * hidden + hidden + hidden + 1
  score_nets = text_dim + latent_channels + mlp(text_dim) + mlp(latent_channels)
  proj = image_dim * text_dim + text_dim + 2 * text_dim
  return kv + (score_nets if scoring == 'adaptive' else 0) + proj


def check_tree_fits(got, expected, what: str) -> None:
  """ValueError when `got` lacks, adds or reshapes any parameter of `expected`."""
  flat_got = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(got)}
  flat_exp = {jax.tree_util.keystr(p): v
              for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  missing = sorted(set(flat_exp) - set(flat_got))
  extra = sorted(set(flat_got) - set(flat_exp))
  if missing or extra:
    raise ValueError(f'{what} does not fit this model: missing {missing[:3]}, unexpected '
                     f'{extra[:3]} ({len(missing)} missing, {len(extra)} unexpected)')
  for key, value in flat_exp.items():
    if tuple(flat_got[key].shape) != tuple(value.shape):
      raise ValueError(f'{what}: {key} has shape {tuple(flat_got[key].shape)}, this '
                       f'model needs {tuple(value.shape)}')
