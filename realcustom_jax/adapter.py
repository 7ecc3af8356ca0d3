"""The trainable adapter: scoring module, visual projection and every visual K/V.

Everything else (the pretrained UNet) stays frozen. Trees are plain nested dicts keyed
like flax params; paths are tuples of keys.

Two kinds of adapter files exist, told apart by their metadata ('adapter_kind'):
'paper', trained here (scoring, visual_proj, visual K/V), and 'release_highres', the
authors' released RealCustom_highres weights converted by `sample.convert_release`
(subject_projector, visual K/V). Neither loads into the other's model.

An adapter file is ONE safetensors file (`save_adapter`): '/'-joined tree paths as keys,
str -> str metadata in its header (the training `config.model` as JSON, the layout, the
kind); `read_adapter` checks its kind and layout and reads it back.
"""
import os
from typing import Any, Mapping

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

Params = dict[str, Any]

VISUAL_KV = ('to_k_visual', 'to_v_visual')
# 'subject_projector': the release's projector (release.model.ReleaseRealCustom).
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
    metadata: the safetensors metadata (`load_adapter_metadata`); files
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


# How the visual K/V start (config.train.visual_kv_init; the paper is silent):
# 'copy_text': both copied from the layer's text to_k / to_v (IP-Adapter's start);
# 'zero_v': to_k_visual copied, to_v_visual zero, so the visual branch adds exactly nothing
# at step 0 and the frozen base's prediction is untouched (ControlNet's zero start). On
# the toy base (docs/toy_reproduction.md, G2) copying made the step-0 noise error 66%
# worse at t = 100, as Eq. 4 adds a second text-sized output, and the adapter first spent
# its steps muting it: after 1000 steps it beat a shuffled subject by 2.6 / 4.2 / 5.2% at
# t = 100 / 400 / 700, the zero start by 6.0 / 10.7 / 13.4%.
VISUAL_KV_INITS = ('zero_v', 'copy_text')


def init_visual_kv(params: Mapping, mode: str = 'zero_v') -> dict:
  """Starts every visual K/V from its layer's text to_k / to_v (see VISUAL_KV_INITS).

  Args:
    params: the full tree (frozen UNet merged with the adapter).
    mode: 'zero_v' (to_k_visual = to_k, to_v_visual = 0) or 'copy_text' (both copied).

  Raises:
    ValueError: for an unknown mode, or a visual projection whose shape differs from
      its text twin's.
  """
  if mode not in VISUAL_KV_INITS:
    raise ValueError(f'visual_kv_init must be one of {VISUAL_KV_INITS}, got {mode!r}')

  def visit(tree: Mapping, path=()) -> dict:
    out = {}
    for k, v in tree.items():
      if k in VISUAL_KV and isinstance(v, Mapping):
        text = tree[k.replace('_visual', '')]
        if text['kernel'].shape != v['kernel'].shape:
          raise ValueError(f'{"/".join(path + (k,))}: shape {v["kernel"].shape} differs '
                           f'from the text projection {text["kernel"].shape}')
        if mode == 'zero_v' and k == 'to_v_visual':
          out[k] = {'kernel': jnp.zeros_like(text['kernel'])}
        else:
          # A copy, not an alias: the adapter is donated to the train step while the
          # frozen tree (holding the text kernel) is passed beside it.
          out[k] = {'kernel': text['kernel'].copy()}
      elif isinstance(v, Mapping):
        out[k] = visit(v, path + (k,))
      else:
        out[k] = v
    return out
  return visit(params)


def init_visual_kv_from_text(params: Mapping) -> dict:
  """Both visual K/V copied from the text K/V (`init_visual_kv(params, 'copy_text')`)."""
  return init_visual_kv(params, 'copy_text')


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


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


# ---------------------------------------------------------------------------------
# The adapter file
# ---------------------------------------------------------------------------------


def save_adapter(path: str, adapter_params: Params,
                 metadata: dict[str, str] | None = None) -> None:
  """Writes adapter parameters to ONE safetensors file.

  Args:
    path: destination, must end in `.safetensors`.
    adapter_params: nested dict of arrays; keys become '/'-joined tree paths.
    metadata: optional str -> str pairs (e.g. the model config as JSON) stored in the
      safetensors header. 'adapter_layout' defaults to `ADAPTER_LAYOUT`.
  """
  path = os.fspath(path)
  if not path.endswith('.safetensors'):
    raise ValueError(f'adapter path {path} must end in .safetensors')
  flat = traverse_util.flatten_dict(flax.core.unfreeze(adapter_params), sep='/')
  if not flat:
    raise ValueError(f'refusing to write an empty adapter to {path}')
  metadata = dict(metadata or {})
  metadata.setdefault('adapter_layout', str(ADAPTER_LAYOUT))
  bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
  if bad:
    raise ValueError(f'adapter metadata must map str to str; bad entries: {bad}')
  arrays = {k: np.ascontiguousarray(jax.device_get(v)) for k, v in flat.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  safetensors.numpy.save_file(arrays, path, metadata=metadata)


def load_adapter(path: str) -> Params:
  """Reads a file written by `save_adapter` back into a nested dict of NumPy arrays."""
  path = os.fspath(path)
  if not path.endswith('.safetensors'):
    raise ValueError(f'adapter path {path} must end in .safetensors')
  if not os.path.isfile(path):
    raise ValueError(f'adapter file {path} does not exist')
  try:
    flat = safetensors.numpy.load_file(path)
  except Exception as e:  # SafetensorError
    raise ValueError(f'cannot read safetensors file {path}: {e}') from None
  return traverse_util.unflatten_dict(flat, sep='/')


def load_adapter_metadata(path: str) -> dict[str, str]:
  """Returns the str -> str metadata stored by `save_adapter` (empty when none)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f'adapter file {path} does not exist')
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      return dict(f.metadata() or {})
  except Exception as e:  # SafetensorError
    raise ValueError(f'cannot read safetensors file {path}: {e}') from None


def read_adapter(path: str, kind: str = PAPER_KIND) -> tuple[Params, dict[str, str]]:
  """An adapter file of `kind`, checked: (tree of NumPy arrays, its metadata).

  Raises:
    ValueError: (one line) no such file, not safetensors, another kind, or a layout
      this version does not read.
  """
  metadata = load_adapter_metadata(path)
  check_adapter_metadata(metadata, f'adapter file {os.fspath(path)}', kind)
  return load_adapter(path), metadata
