"""Torch-free loading of Stable Diffusion (1.x, 2.x, XL) and CLIP weights.

Real checkpoints are read from local diffusers/transformers directories in the
libraries' own on-disk formats. Safetensors and Flax msgpack files never need torch;
pickle-based `.bin` files are refused unless the caller opts in (`allow_pickle=True`),
because unpickling can run arbitrary code.
"""
import dataclasses
import json
import logging
import os
import types
from typing import Any

from diffusers import FlaxAutoencoderKL
from diffusers.models import modeling_flax_pytorch_utils as diffusers_convert
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from transformers import CLIPTextConfig
from transformers import CLIPTokenizer
from transformers import CLIPVisionConfig
from transformers import FlaxCLIPTextModel
from transformers import FlaxCLIPTextModelWithProjection
from transformers import FlaxCLIPVisionModel
from transformers import modeling_flax_pytorch_utils as transformers_convert

from realcustom_jax import unet as unet_lib


# CLIP's own preprocessing constants (openai/clip-vit-*), used when a vision model
# directory carries no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC

# Weight files in order of preference: safetensors, Flax msgpack, then pickle.
_DIFFUSERS_FILES = (
    'diffusion_pytorch_model.safetensors',
    'diffusion_pytorch_model.safetensors.index.json',
    'diffusion_pytorch_model.fp16.safetensors',
    'diffusion_flax_model.msgpack',
    'diffusion_pytorch_model.bin',
)
_TRANSFORMERS_FILES = (
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


@dataclasses.dataclass
class StableDiffusionComponents:
  """The frozen parts of a Stable Diffusion 1.x / 2.x pipeline, as Flax modules + params.

  Attributes:
    unet_config: the UNet's config.json as a dict (lists turned into tuples, private
      `_`-keys dropped); builds diffusers' FlaxUNet2DConditionModel or our UNet.
    unet_params: parameter tree in diffusers' FlaxUNet2DConditionModel layout.
    vae: diffusers' FlaxAutoencoderKL module.
    vae_params: its parameters.
    vae_scale_factor: pixels per latent cell, 2 ** (len(block_out_channels) - 1).
    scaling_factor: latent scale (z = scaling_factor * vae.encode(x)).
    text_encoder: transformers' FlaxCLIPTextModel (call with `params=text_params`).
    text_params: its parameters.
    tokenizer: the CLIPTokenizer that goes with the text encoder.
    scheduler_config: scheduler/scheduler_config.json as a dict.
  """
  unet_config: dict[str, Any]
  unet_params: Params = dataclasses.field(repr=False)
  vae: FlaxAutoencoderKL
  vae_params: Params = dataclasses.field(repr=False)
  vae_scale_factor: int
  scaling_factor: float
  text_encoder: FlaxCLIPTextModel
  text_params: Params = dataclasses.field(repr=False)
  tokenizer: CLIPTokenizer
  scheduler_config: dict[str, Any]


@dataclasses.dataclass
class SDXLComponents:
  """The frozen parts of an SDXL pipeline, as Flax modules + params.

  Attributes:
    unet_config: the UNet's config.json as a dict (lists turned into tuples, private
      `_`-keys dropped); builds our RealCustomUNet.
    unet_params: parameter tree in diffusers' FlaxUNet2DConditionModel layout
      (with `add_embedding`).
    vae: diffusers' FlaxAutoencoderKL module.
    vae_params: its parameters.
    vae_scale_factor: pixels per latent cell, 2 ** (len(block_out_channels) - 1).
    scaling_factor: latent scale from the VAE config (SDXL: 0.13025).
    text_encoder: FlaxCLIPTextModel of text_encoder/.
    text_encoder_2: FlaxCLIPTextModel of text_encoder_2/ (its projection, when the
      checkpoint has one, is kept apart in text_params).
    text_params: {'text_encoder': ..., 'text_encoder_2': ...[, 'text_projection':
      (c2, p) kernel]}, what `sdxl_text.encode` takes.
    tokenizer: CLIPTokenizer of tokenizer/.
    tokenizer_2: CLIPTokenizer of tokenizer_2/.
    scheduler_config: scheduler/scheduler_config.json as a dict; None when the
      directory has no scheduler/ (the release brings its own schedule).
  """
  unet_config: dict[str, Any]
  unet_params: Params = dataclasses.field(repr=False)
  vae: FlaxAutoencoderKL
  vae_params: Params = dataclasses.field(repr=False)
  vae_scale_factor: int
  scaling_factor: float
  text_encoder: FlaxCLIPTextModel
  text_encoder_2: FlaxCLIPTextModel
  text_params: Params = dataclasses.field(repr=False)
  tokenizer: CLIPTokenizer
  tokenizer_2: CLIPTokenizer
  scheduler_config: dict[str, Any] | None


@dataclasses.dataclass
class VisionEncoder:
  """A CLIP vision tower with its preprocessing settings.

  Attributes:
    model: transformers' FlaxCLIPVisionModel (call with `params=params`).
    params: its parameters.
    image_size: side of the square crop the model takes (config image_size).
    resize_size: the shorter image side is resized to this before the crop.
    mean: per-channel normalisation mean (RGB, in [0, 1] units).
    std: per-channel normalisation std.
    resample: PIL resampling filter code for the resize (3 = bicubic).
  """
  model: FlaxCLIPVisionModel
  params: Params = dataclasses.field(repr=False)
  image_size: int
  resize_size: int
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  resample: int = BICUBIC

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.model.config.patch_size) ** 2

  @property
  def hidden_size(self) -> int:
    return self.model.config.hidden_size


# ---------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'missing config file {path}') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path} is not valid JSON: {e}') from None


def _find_weights(folder: str, candidates: tuple[str, ...]) -> str:
  for name in candidates:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path
  raise CheckpointError(
      f'no weights file in {folder}: expected one of {", ".join(candidates)}')


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises its own SafetensorError on bad files
    raise CheckpointError(f'cannot read safetensors file {path}: {e}') from None


def _read_pickle(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
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


def _read_torch_state(path: str, allow_pickle: bool) -> dict[str, np.ndarray]:
  """Reads a flat torch-layout state dict from safetensors (one or sharded) or .bin."""
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  if path.endswith('.index.json'):
    shard_names = sorted(set(_read_json(path).get('weight_map', {}).values()))
    if not shard_names:
      raise CheckpointError(f'sharded index {path} lists no weight files')
    state = {}
    for name in shard_names:
      state.update(_read_safetensors(os.path.join(os.path.dirname(path), name)))
    return state
  return _read_pickle(path, allow_pickle)


def _read_msgpack(path: str) -> Params:
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


def _check_and_cast(tree: Params, shapes: Params, path: str, dtype) -> Params:
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


def _load_diffusers_params(module, folder: str, allow_pickle: bool, dtype) -> Params:
  """Loads a diffusers model folder's weights into the Flax `module`'s param tree."""
  path = _find_weights(folder, _DIFFUSERS_FILES)
  # Shapes only: a real random init of an 860M-parameter UNet would cost minutes on CPU.
  shapes = jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))
  if path.endswith('.msgpack'):
    tree = _read_msgpack(path)
  else:
    state = _read_torch_state(path, allow_pickle)
    shim = types.SimpleNamespace(init_weights=lambda rng: shapes)
    try:
      tree = diffusers_convert.convert_pytorch_state_dict_to_flax(
          {k: _Tensor(v) for k, v in state.items()}, shim)
    except (ValueError, AssertionError) as e:  # the converter asserts on some shapes
      raise CheckpointError(f'{path} does not fit its config.json: {e}') from None
  return _check_and_cast(tree, shapes, path, dtype)


def _load_transformers_params(model, folder: str, allow_pickle: bool, dtype) -> Params:
  """Loads a transformers model folder's weights into the Flax `model`'s param tree."""
  path = _find_weights(folder, _TRANSFORMERS_FILES)
  shapes = model.params_shape_tree
  if path.endswith('.msgpack'):
    tree = _read_msgpack(path)
  else:
    state = _read_torch_state(path, allow_pickle)
    shim = types.SimpleNamespace(params=shapes, base_model_prefix=model.base_model_prefix)
    try:
      tree = transformers_convert.convert_pytorch_state_dict_to_flax(state, shim)
    except (ValueError, AssertionError) as e:
      raise CheckpointError(f'{path} does not fit its config.json: {e}') from None
  return _check_and_cast(tree, shapes, path, dtype)


def _subfolder(path: str, name: str) -> str:
  folder = os.path.join(path, name)
  if not os.path.isdir(folder):
    raise CheckpointError(
        f'{path} has no {name}/ subfolder: expected a diffusers-format Stable Diffusion '
        'directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/)')
  return folder


def _as_tuples(value):
  if isinstance(value, list):
    return tuple(_as_tuples(v) for v in value)
  return value


def _check_unet_config(config: dict[str, Any], path: str, sdxl: bool) -> None:
  """Refuses UNets that are not the text-conditioned SD 1.x / 2.x (or SDXL) kind."""
  name = config.get('_class_name', 'UNet2DConditionModel')
  if name != 'UNet2DConditionModel':
    raise CheckpointError(f'{path}: _class_name {name!r} is not supported, expected '
                          'UNet2DConditionModel (Stable Diffusion 1.x / 2.x / XL)')
  kind = config.get('addition_embed_type')
  if kind not in (None, 'text_time'):
    raise CheckpointError(f'{path}: addition_embed_type={kind!r} is not supported (only '
                          "None, SD 1.x / 2.x, and 'text_time', SDXL)")
  if sdxl and kind != 'text_time':
    raise CheckpointError(
        f"{path}: addition_embed_type={kind!r}, not SDXL's 'text_time': load a Stable "
        'Diffusion 1.x / 2.x directory with load_stable_diffusion')
  if not sdxl and kind is not None:
    raise CheckpointError(
        f"{path}: addition_embed_type='text_time' is an SDXL UNet: load the directory "
        'with load_sdxl')
  if config.get('in_channels', 4) != 4:
    raise CheckpointError(
        f'{path}: in_channels={config["in_channels"]} (inpainting/depth UNet) is not '
        'supported; RealCustom needs a text-to-image UNet with 4 latent channels')
  try:
    unet_lib.check_config(config)  # the architecture our UNet builds
  except ValueError as e:
    raise CheckpointError(f'{path}: {e}') from None


def _load_unet(unet_dir: str, allow_pickle: bool, dtype, sdxl: bool) -> tuple[dict, Params]:
  """(config dict, params) of a diffusers `unet/` folder."""
  raw = _read_json(os.path.join(unet_dir, 'config.json'))
  _check_unet_config(raw, os.path.join(unet_dir, 'config.json'), sdxl)
  unet_config = {k: _as_tuples(v) for k, v in raw.items() if not k.startswith('_')}
  # Imported where used: diffusers logs a deprecation notice when this module loads,
  # which an import of the library should not do.
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  unet = FlaxUNet2DConditionModel.from_config(unet_config)
  return unet_config, _load_diffusers_params(unet, unet_dir, allow_pickle, dtype)


def _load_vae(vae_dir: str, allow_pickle: bool, dtype) -> tuple[FlaxAutoencoderKL, Params,
                                                                 dict]:
  """(module, params, raw config) of a diffusers `vae/` folder."""
  vae_config = _read_json(os.path.join(vae_dir, 'config.json'))
  vae = FlaxAutoencoderKL.from_config(
      {k: _as_tuples(v) for k, v in vae_config.items() if not k.startswith('_')})
  return vae, _load_diffusers_params(vae, vae_dir, allow_pickle, dtype), vae_config


# ---------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------


def load_tokenizer(path: str, subfolder: str = 'tokenizer') -> CLIPTokenizer:
  """A CLIP tokenizer of a diffusers SD directory (`tokenizer/`), cheap to read.

  Args:
    path: the diffusers directory.
    subfolder: 'tokenizer', or SDXL's 'tokenizer_2'.

  Raises:
    CheckpointError: a missing directory or tokenizer file.
  """
  tok_dir = _subfolder(path, subfolder)
  for name in ('vocab.json', 'merges.txt'):
    if not os.path.isfile(os.path.join(tok_dir, name)):
      raise CheckpointError(f'tokenizer file {os.path.join(tok_dir, name)} is missing')
  return CLIPTokenizer.from_pretrained(tok_dir)


def load_stable_diffusion(path: str, allow_pickle: bool = False,
                          dtype=jnp.float32) -> StableDiffusionComponents:
  """Loads a local diffusers-format Stable Diffusion 1.x / 2.x directory without torch.

  Args:
    path: directory with unet/, vae/, text_encoder/, tokenizer/ and scheduler/.
    allow_pickle: also accept torch `.bin` weights (needs torch; unpickling runs code).
    dtype: cast floating parameters to this dtype; None keeps the files' dtypes.

  Returns:
    The StableDiffusionComponents.

  Raises:
    CheckpointError: (a ValueError) for a missing directory, subfolder, config or
      weights file, pickle weights without `allow_pickle`, or an unsupported UNet.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'Stable Diffusion directory {path} does not exist')

  # ---- UNet ----
  unet_dir = _subfolder(path, 'unet')
  unet_config, unet_params = _load_unet(unet_dir, allow_pickle, dtype, sdxl=False)

  # ---- VAE ----
  vae, vae_params, vae_config = _load_vae(_subfolder(path, 'vae'), allow_pickle, dtype)

  # ---- Text encoder and tokenizer ----
  text_dir = _subfolder(path, 'text_encoder')
  _read_json(os.path.join(text_dir, 'config.json'))  # clear error when it is missing
  text_config = CLIPTextConfig.from_pretrained(text_dir)
  if text_config.hidden_size != unet_config.get('cross_attention_dim', 1280):
    raise CheckpointError(
        f'{text_dir}: text hidden_size {text_config.hidden_size} does not match the '
        f'UNet cross_attention_dim {unet_config.get("cross_attention_dim", 1280)}')
  text_encoder = FlaxCLIPTextModel(text_config, _do_init=False)
  text_params = _load_transformers_params(text_encoder, text_dir, allow_pickle, dtype)

  tokenizer = load_tokenizer(path)

  # ---- Scheduler ----
  sched_dir = _subfolder(path, 'scheduler')
  scheduler_config = _read_json(os.path.join(sched_dir, 'scheduler_config.json'))

  return StableDiffusionComponents(
      unet_config=unet_config,
      unet_params=unet_params,
      vae=vae,
      vae_params=vae_params,
      vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
      scaling_factor=float(vae_config.get('scaling_factor', 0.18215)),
      text_encoder=text_encoder,
      text_params=text_params,
      tokenizer=tokenizer,
      scheduler_config=scheduler_config,
  )


def load_sdxl(path: str, allow_pickle: bool = False, dtype=jnp.float32) -> SDXLComponents:
  """Loads a local diffusers-format SDXL directory without torch.

  Args:
    path: directory with unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
      tokenizer_2/ and optionally scheduler/.
    allow_pickle: also accept torch `.bin` weights (needs torch; unpickling runs code).
    dtype: cast floating parameters to this dtype; None keeps the files' dtypes.

  Returns:
    The SDXLComponents.

  Raises:
    CheckpointError: (a ValueError, one line naming the file) for a missing directory,
      subfolder, config, weights or tokenizer file, pickle weights without
      `allow_pickle`, a UNet that is not SDXL-shaped, or text widths that do not add up
      to the UNet's conditioning widths.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'SDXL directory {path} does not exist')
  names = ('unet', 'vae', 'text_encoder', 'text_encoder_2', 'tokenizer', 'tokenizer_2')
  for name in names:
    if not os.path.isdir(os.path.join(path, name)):
      raise CheckpointError(
          f'{path} has no {name}/ subfolder: expected a diffusers-format SDXL directory '
          f'({", ".join(n + "/" for n in names)})')
  # An SD 1.x / 2.x directory is told so before anything is loaded.
  unet_dir = os.path.join(path, 'unet')
  unet_json = os.path.join(unet_dir, 'config.json')
  raw_unet = _read_json(unet_json)
  _check_unet_config(raw_unet, unet_json, sdxl=True)

  # ---- Text encoders and tokenizers ----
  tokenizer = load_tokenizer(path, 'tokenizer')
  tokenizer_2 = load_tokenizer(path, 'tokenizer_2')
  text_encoder, params_1, _ = load_text_encoder(
      os.path.join(path, 'text_encoder'), allow_pickle, dtype)
  text_encoder_2, params_2, projection = load_text_encoder(
      os.path.join(path, 'text_encoder_2'), allow_pickle, dtype)
  text_params = {'text_encoder': params_1, 'text_encoder_2': params_2}
  if projection is not None:
    text_params['text_projection'] = projection

  # ---- UNet: it must take what the text encoders give ----
  widths = (text_encoder.config.hidden_size, text_encoder_2.config.hidden_size)
  cross = raw_unet.get('cross_attention_dim')
  if sum(widths) != cross:
    raise CheckpointError(
        f'{unet_json}: cross_attention_dim {cross} is not the sum of the text encoders\' '
        f'hidden sizes {widths[0]} + {widths[1]}')
  pooled = (raw_unet['projection_class_embeddings_input_dim']
            - 6 * raw_unet['addition_time_embed_dim'])
  if pooled != widths[1]:
    raise CheckpointError(
        f'{unet_json}: the UNet takes a {pooled}-wide pooled text embedding beside 6 time '
        f'ids, text_encoder_2 gives {widths[1]}')
  unet_config, unet_params = _load_unet(unet_dir, allow_pickle, dtype, sdxl=True)

  # ---- VAE ----
  vae, vae_params, vae_config = _load_vae(os.path.join(path, 'vae'), allow_pickle, dtype)

  # ---- Scheduler (optional) ----
  sched_path = os.path.join(path, 'scheduler', 'scheduler_config.json')
  scheduler_config = _read_json(sched_path) if os.path.isfile(sched_path) else None

  return SDXLComponents(
      unet_config=unet_config,
      unet_params=unet_params,
      vae=vae,
      vae_params=vae_params,
      vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
      scaling_factor=float(vae_config.get('scaling_factor', 0.13025)),
      text_encoder=text_encoder,
      text_encoder_2=text_encoder_2,
      text_params=text_params,
      tokenizer=tokenizer,
      tokenizer_2=tokenizer_2,
      scheduler_config=scheduler_config,
  )


def load_text_encoder(text_dir: str, allow_pickle: bool = False, dtype=jnp.float32
                      ) -> tuple[FlaxCLIPTextModel, Params, Any]:
  """Loads a transformers CLIP text model folder without torch.

  A CLIPTextModelWithProjection checkpoint (SDXL's text_encoder_2/) is read whole, its
  projection split off: the encoder itself then runs as the plain CLIPTextModel the
  RealCustom release uses.

  Args:
    text_dir: folder with config.json and weights (CLIPTextModel or
      CLIPTextModelWithProjection).
    allow_pickle: also accept `pytorch_model.bin` (needs torch).
    dtype: cast floating parameters to this dtype; None keeps the file's dtypes.

  Returns:
    (FlaxCLIPTextModel, its params {'text_model': ...}, the (hidden, projection_dim)
    text_projection kernel or None).

  Raises:
    CheckpointError: a missing config or weights file, or weights that do not fit.
  """
  config_path = os.path.join(text_dir, 'config.json')
  architectures = _read_json(config_path).get('architectures') or []
  config = CLIPTextConfig.from_pretrained(text_dir)
  if 'CLIPTextModelWithProjection' in architectures:
    tree = _load_transformers_params(FlaxCLIPTextModelWithProjection(config, _do_init=False),
                                     text_dir, allow_pickle, dtype)
    projection = tree['text_projection']['kernel']
  else:
    tree, projection = _load_transformers_params(
        FlaxCLIPTextModel(config, _do_init=False), text_dir, allow_pickle, dtype), None
  return FlaxCLIPTextModel(config, _do_init=False), {'text_model': tree['text_model']}, projection


def _size_of(value, key: str) -> int | None:
  """Reads an image-processor size entry: an int or {'shortest_edge'|'height': n}."""
  if value is None or isinstance(value, int):
    return value
  return value.get(key, value.get('height'))


def load_vision_encoder(path: str, allow_pickle: bool = False,
                        dtype=jnp.float32) -> VisionEncoder:
  """Loads a local transformers CLIP vision model directory without torch.

  Accepts CLIPVisionModel, CLIPVisionModelWithProjection and full CLIPModel
  directories (only the vision tower is kept).

  Args:
    path: directory with config.json, weights and (optionally) preprocessor_config.json.
    allow_pickle: also accept `pytorch_model.bin` (needs torch).
    dtype: cast floating parameters to this dtype; None keeps the file's dtypes.

  Returns:
    The VisionEncoder, preprocessing read from preprocessor_config.json (CLIP's
    defaults when absent).
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f'vision encoder directory {path} does not exist')
  _read_json(os.path.join(path, 'config.json'))
  config = CLIPVisionConfig.from_pretrained(path)  # takes vision_config of a CLIPModel
  model = FlaxCLIPVisionModel(config, _do_init=False)
  params = _load_transformers_params(model, path, allow_pickle, dtype)

  pre_path = os.path.join(path, 'preprocessor_config.json')
  pre = _read_json(pre_path) if os.path.isfile(pre_path) else {}
  image_size = _size_of(pre.get('crop_size'), 'height') or config.image_size
  resize_size = _size_of(pre.get('size'), 'shortest_edge') or image_size
  if image_size != config.image_size:
    raise CheckpointError(
        f'{pre_path}: crop size {image_size} differs from the model image_size '
        f'{config.image_size}')
  return VisionEncoder(
      model=model,
      params=params,
      image_size=int(image_size),
      resize_size=int(resize_size),
      mean=tuple(float(x) for x in pre.get('image_mean', CLIP_MEAN)),
      std=tuple(float(x) for x in pre.get('image_std', CLIP_STD)),
      resample=int(pre.get('resample', BICUBIC)),
  )
