"""Torch-free loading of Stable Diffusion (1.x, 2.x) and CLIP weights as Flax modules.

Real checkpoints are read from local diffusers/transformers directories in the
libraries' own on-disk formats (`formats`: safetensors and Flax msgpack never need
torch; pickle-based `.bin` files only with `allow_pickle=True`). SDXL, the release's
base, is assembled from the same pieces in `realcustom_jax.release.sdxl_loading`.
"""
import dataclasses
import os
from typing import Any

from diffusers import FlaxAutoencoderKL
import flax
import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTextConfig
from transformers import CLIPTokenizer
from transformers import CLIPVisionConfig

from realcustom_jax import clip
from realcustom_jax import unet as unet_lib
from realcustom_jax.loading import formats
from realcustom_jax.loading.formats import CheckpointError  # noqa: F401 (the loaders' error)
from realcustom_jax.loading.formats import Params


# CLIP's own preprocessing constants (openai/clip-vit-*), used when a vision model
# directory carries no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC


@dataclasses.dataclass
class DenoiserComponents:
  """The UNet and VAE of a diffusers SD / SDXL directory (`load_denoiser`).

  Attributes:
    unet_config: the UNet's config.json as a dict (lists turned into tuples, private
      `_`-keys dropped); builds diffusers' FlaxUNet2DConditionModel or our UNet.
    unet_params: parameter tree in diffusers' FlaxUNet2DConditionModel layout (SDXL's
      with `add_embedding`).
    vae: diffusers' FlaxAutoencoderKL module.
    vae_params: its parameters.
    vae_scale_factor: pixels per latent cell, 2 ** (len(block_out_channels) - 1).
    scaling_factor: latent scale (z = scaling_factor * vae.encode(x)), from the VAE
      config (default SD 0.18215, SDXL 0.13025).
  """
  unet_config: dict[str, Any]
  unet_params: Params = dataclasses.field(repr=False)
  vae: FlaxAutoencoderKL
  vae_params: Params = dataclasses.field(repr=False)
  vae_scale_factor: int
  scaling_factor: float


@dataclasses.dataclass
class StableDiffusionComponents(DenoiserComponents):
  """The frozen parts of a Stable Diffusion 1.x / 2.x pipeline, as Flax modules + params:
  `DenoiserComponents` and

  Attributes:
    text_encoder: the project's `clip.CLIPTextModel` (`apply({'params': text_params}, ids)`).
    text_params: its parameters.
    tokenizer: the CLIPTokenizer that goes with the text encoder.
    scheduler_config: scheduler/scheduler_config.json as a dict.
  """
  text_encoder: clip.CLIPTextModel
  text_params: Params = dataclasses.field(repr=False)
  tokenizer: CLIPTokenizer
  scheduler_config: dict[str, Any]


@dataclasses.dataclass
class VisionEncoder:
  """A CLIP vision tower with its preprocessing settings.

  Attributes:
    model: the project's `clip.CLIPVisionModel` (`apply({'params': params}, pixels)`,
      pixels NHWC).
    params: its parameters.
    image_size: side of the square crop the model takes (config image_size).
    resize_size: the shorter image side is resized to this before the crop.
    mean: per-channel normalisation mean (RGB, in [0, 1] units).
    std: per-channel normalisation std.
    resample: PIL resampling filter code for the resize (3 = bicubic).
  """
  model: clip.CLIPVisionModel
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


def check_unet_config(config: dict[str, Any], path: str, sdxl: bool) -> None:
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


def load_unet(unet_dir: str, allow_pickle: bool, dtype, sdxl: bool) -> tuple[dict, Params]:
  """(config dict, params) of a diffusers `unet/` folder."""
  raw = formats.read_json(os.path.join(unet_dir, 'config.json'))
  check_unet_config(raw, os.path.join(unet_dir, 'config.json'), sdxl)
  unet_config = {k: formats.as_tuples(v) for k, v in raw.items() if not k.startswith('_')}
  # Imported where used: diffusers logs a deprecation notice when this module loads,
  # which an import of the library should not do.
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  unet = FlaxUNet2DConditionModel.from_config(unet_config)
  return unet_config, formats.load_diffusers_params(unet, unet_dir, allow_pickle, dtype)


def load_vae(vae_dir: str, allow_pickle: bool, dtype) -> tuple[FlaxAutoencoderKL, Params,
                                                                 dict]:
  """(module, params, raw config) of a diffusers `vae/` folder."""
  vae_config = formats.read_json(os.path.join(vae_dir, 'config.json'))
  vae = FlaxAutoencoderKL.from_config(
      {k: formats.as_tuples(v) for k, v in vae_config.items() if not k.startswith('_')})
  return vae, formats.load_diffusers_params(vae, vae_dir, allow_pickle, dtype), vae_config


def load_denoiser(path: str, allow_pickle: bool, dtype, sdxl: bool,
                  default_scaling: float) -> dict[str, Any]:
  """The UNet and VAE of a diffusers SD / SDXL directory, as the components' fields
  (unet_config, unet_params, vae, vae_params, vae_scale_factor, scaling_factor)."""
  unet_config, unet_params = load_unet(os.path.join(path, 'unet'), allow_pickle, dtype, sdxl)
  vae, vae_params, vae_config = load_vae(os.path.join(path, 'vae'), allow_pickle, dtype)
  return dict(unet_config=unet_config, unet_params=unet_params, vae=vae,
              vae_params=vae_params,
              vae_scale_factor=2 ** (len(vae.config.block_out_channels) - 1),
              scaling_factor=float(vae_config.get('scaling_factor', default_scaling)))


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
  tok_dir = formats.subfolder(path, subfolder)
  # vocab.json + merges.txt (the hub's SD folders), or tokenizer.json alone (what
  # transformers 5's save_pretrained writes).
  if not os.path.isfile(os.path.join(tok_dir, 'tokenizer.json')):
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

  # ---- UNet and VAE ----
  for name in ('unet', 'vae'):
    formats.subfolder(path, name)  # a missing one is named
  denoiser = load_denoiser(path, allow_pickle, dtype, sdxl=False, default_scaling=0.18215)
  unet_config = denoiser['unet_config']

  # ---- Text encoder and tokenizer ----
  text_dir = formats.subfolder(path, 'text_encoder')
  formats.read_json(os.path.join(text_dir, 'config.json'))  # clear error when it is missing
  text_config = CLIPTextConfig.from_pretrained(text_dir)
  if text_config.hidden_size != unet_config.get('cross_attention_dim', 1280):
    raise CheckpointError(
        f'{text_dir}: text hidden_size {text_config.hidden_size} does not match the '
        f'UNet cross_attention_dim {unet_config.get("cross_attention_dim", 1280)}')
  text_encoder = clip.CLIPTextModel(_clip_config(text_config, text_dir))
  text_params = load_clip_params(text_encoder, text_dir, allow_pickle, dtype)

  tokenizer = load_tokenizer(path)

  # ---- Scheduler ----
  sched_dir = formats.subfolder(path, 'scheduler')
  scheduler_config = formats.read_json(os.path.join(sched_dir, 'scheduler_config.json'))

  return StableDiffusionComponents(
      **denoiser, text_encoder=text_encoder, text_params=text_params, tokenizer=tokenizer,
      scheduler_config=scheduler_config)


def _clip_config(config, path: str, with_projection: bool = False) -> clip.CLIPConfig:
  """transformers' CLIPTextConfig / CLIPVisionConfig as the project's tower config."""
  try:
    return clip.CLIPConfig.from_dict(config, with_projection=with_projection)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f'{path}: {e}') from None


def load_clip_params(module, folder: str, allow_pickle: bool, dtype) -> Params:
  """A transformers CLIP folder's weights (safetensors, Flax msgpack, or `.bin` with
  `allow_pickle`) as the project's tree for `module` (`clip.CLIPTextModel` or
  `clip.CLIPVisionModel`; a whole CLIPModel's file gives its one tower).

  Raises:
    CheckpointError: no weights file, or weights that do not fit the config.
  """
  tower, shapes = clip.tower_name(module), clip.param_shapes(module)
  return load_transformers_weights(
      folder, shapes, lambda state: clip.params_from_torch_state(state, tower, shapes),
      lambda tree: clip.params_from_flax_layout(tree, tower, shapes), allow_pickle, dtype)


def load_transformers_weights(folder: str, shapes: Params, from_torch_state, from_flax_tree,
                              allow_pickle: bool, dtype) -> Params:
  """A transformers folder's weights file (`formats.TRANSFORMERS_FILES`, in that order)
  through the converter of its layout: `from_torch_state` (name -> array, torch names)
  or `from_flax_tree` (a `flax_model.msgpack` tree); checked against `shapes` and cast
  to `dtype` (None: the file's).

  Raises:
    CheckpointError: no weights file, or a converter's ValueError (one line).
  """
  path = formats.find_weights(folder, formats.TRANSFORMERS_FILES)
  try:
    if path.endswith('.msgpack'):
      tree = from_flax_tree(formats.read_msgpack(path))
    else:
      tree = from_torch_state(formats.read_torch_state(path, allow_pickle))
  except ValueError as e:
    raise CheckpointError(f'{path} does not fit its config.json: {e}') from None
  return formats.check_and_cast(tree, shapes, path, dtype)


def save_clip_tower(folder: str, config, params: Params, tower: str) -> None:
  """Writes a tower where `load_clip_params` reads it: transformers' `config.json`
  (`config`, a CLIPTextConfig / CLIPVisionConfig) and `flax_model.msgpack` in
  transformers' Flax layout (`clip.params_to_flax_layout`), torch-free."""
  os.makedirs(folder, exist_ok=True)
  config.save_pretrained(folder)
  tree = jax.tree.map(np.asarray, clip.params_to_flax_layout(params, tower))
  with open(os.path.join(folder, 'flax_model.msgpack'), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(tree))


def load_text_encoder(text_dir: str, allow_pickle: bool = False, dtype=jnp.float32
                      ) -> tuple[clip.CLIPTextModel, Params, Any]:
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
    (clip.CLIPTextModel without projection, its params, the (hidden, projection_dim)
    text_projection kernel or None).

  Raises:
    CheckpointError: a missing config or weights file, or weights that do not fit.
  """
  config_path = os.path.join(text_dir, 'config.json')
  architectures = formats.read_json(config_path).get('architectures') or []
  config = CLIPTextConfig.from_pretrained(text_dir)
  with_projection = 'CLIPTextModelWithProjection' in architectures
  tree = load_clip_params(clip.CLIPTextModel(_clip_config(config, text_dir, with_projection)),
                          text_dir, allow_pickle, dtype)
  projection = tree.pop('text_projection')['kernel'] if with_projection else None
  return clip.CLIPTextModel(_clip_config(config, text_dir)), tree, projection


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
  formats.read_json(os.path.join(path, 'config.json'))
  config = CLIPVisionConfig.from_pretrained(path)  # takes vision_config of a CLIPModel
  model = clip.CLIPVisionModel(_clip_config(config, path))
  params = load_clip_params(model, path, allow_pickle, dtype)

  pre_path = os.path.join(path, 'preprocessor_config.json')
  pre = formats.read_json(pre_path) if os.path.isfile(pre_path) else {}
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
