"""The on-disk formats the loaders read, torch-free: JSON configs, safetensors (one file
or sharded), Flax msgpack and, only when the caller opts in, torch pickles; a folder's
weights converted into a Flax module's parameter tree and checked against its shapes.

Pickle-based `.bin` files are refused unless `allow_pickle=True`, because unpickling can
run arbitrary code.
"""
import json
import logging
import os
import types
from typing import Any

from diffusers.models import modeling_flax_pytorch_utils as diffusers_convert
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

# Weight files in order of preference: safetensors, Flax msgpack, then pickle.
DIFFUSERS_FILES = (
    'diffusion_pytorch_model.safetensors',
    'diffusion_pytorch_model.safetensors.index.json',
    'diffusion_pytorch_model.fp16.safetensors',
    'diffusion_flax_model.msgpack',
    'diffusion_pytorch_model.bin',
)
TRANSFORMERS_FILES = (
    'model.safetensors',
    'model.safetensors.index.json',
    'model.fp16.safetensors',
    'flax_model.msgpack',
    'pytorch_model.bin',
)

Params = dict[str, Any]
_LOG = logging.getLogger(__name__)


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be loaded as asked."""


def read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'missing config file {path}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path} is not valid JSON: {e}') from None


def find_weights(folder: str, candidates: tuple[str, ...]) -> str:
  for name in candidates:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise CheckpointError(
      f'no weights file in {folder}: expected one of {", ".join(candidates)}')


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own SafetensorError on bad files
    raise CheckpointError(f'cannot read safetensors file {path}: {e}') from None


def read_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  """Reads a torch `.bin` state dict; the only route that needs torch."""
  if not allow_pickle:
    raise CheckpointError(
        f'refusing pickle-based weights {path}: convert them to safetensors or pass '
        'allow_pickle=True (config.allow_pickle) if you trust the file')
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise CheckpointError(
        f'loading pickle-based weights {path} needs torch, which is not installed; '
        'install torch or convert the file to safetensors') from None
  state = torch.load(path, map_location='cpu', weights_only=True)
  # numpy has no bfloat16 view of torch tensors, so go through float32 there.
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
          for k, v in state.items()}


def read_torch_state(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  """Reads a flat torch-layout state dict from safetensors (one or sharded) or .bin."""
  if path.endswith('.safetensors'):
    return read_safetensors(path)
  if path.endswith('.index.json'):
    shard_names = sorted(set(read_json(path).get('weight_map', {}).values()))
    if not shard_names:
      raise CheckpointError(f'sharded index {path} lists no weight files')
    state = {}
    for name in shard_names:
      state.update(read_safetensors(os.path.join(os.path.dirname(path), name)))
    return state
  return read_pickle(path, allow_pickle)


def read_msgpack(path: str) -> Params:
  with open(path, 'rb') as f:
    try:
      return flax.serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on bad bytes
      raise CheckpointError(f'cannot read Flax msgpack file {path}: {e}') from None


class _Tensor:
  """Gives a NumPy array the `.numpy()` that diffusers' converter calls."""

  def __init__(self, array: np.ndarray):
    self._array = array

  def numpy(self) -> np.ndarray:
    return self._array


def check_and_cast(tree: Params, shapes: Params, path: str, dtype) -> Params:
  """Keeps the expected leaves, refuses missing/misshapen ones, casts floats."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(tree))
  want = traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  missing = sorted('/'.join(k) for k in want if k not in flat)
  if missing:
    raise CheckpointError(
        f'{path} lacks {len(missing)} parameter(s) that its config needs '
        f'(e.g. {", ".join(missing[:3])}): weights and config.json do not match')
  unused = sorted('/'.join(k) for k in flat if k not in want)
  if unused:
    _LOG.warning('ignoring %d unused tensor(s) in %s (e.g. %s)', len(unused), path,
                    ', '.join(unused[:3]))
  out = {}
  for key, shape in want.items():
    value = flat[key]
    if tuple(value.shape) != tuple(shape.shape):
      raise CheckpointError(
          f'{path}: parameter {"/".join(key)} has shape {tuple(value.shape)}, config '
          f'expects {tuple(shape.shape)}')
    value = jnp.asarray(value)
    if dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
      value = value.astype(dtype)
    out[key] = value
  return traverse_util.unflatten_dict(out)


def load_diffusers_params(module, folder: str, allow_pickle: bool, dtype) -> Params:
  """Loads a diffusers model folder's weights into the Flax `module`'s param tree."""
  path = find_weights(folder, DIFFUSERS_FILES)
  # Shapes only: a real random init of an 860M-parameter UNet would cost minutes on CPU.
  shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
  if path.endswith('.msgpack'):
    tree = read_msgpack(path)
  else:
    state = read_torch_state(path, allow_pickle)
    shim = types.SimpleNamespace(init_weights=lambda rng: shapes)
    try:
      tree = diffusers_convert.convert_pytorch_state_dict_to_flax(
          {k: _Tensor(v) for k, v in state.items()}, shim)
    except (ValueError, AssertionError) as e:  # the converter asserts on some shapes
      raise CheckpointError(f'{path} does not fit its config.json: {e}') from None
  return check_and_cast(tree, shapes, path, dtype)


def subfolder(path: str, name: str) -> str:
  folder = os.path.join(path, name)
  if not os.path.isdir(folder):
    raise CheckpointError(
        f'{path} has no {name}/ subfolder: expected a diffusers-format Stable Diffusion '
        'directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)')
  return folder


def as_tuples(value):
  if isinstance(value, list):
    return tuple(as_tuples(v) for v in value)
  return value
