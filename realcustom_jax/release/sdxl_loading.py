"""Torch-free loading of a local diffusers-format SDXL directory: the release's base.

The Stable Diffusion loaders' pieces (`weights.load_unet`, `load_vae`,
`load_text_encoder`, `load_tokenizer`) assembled for SDXL's two text encoders and its
`text_time` UNet.
"""
import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from transformers import CLIPTokenizer

from realcustom_jax import clip
from realcustom_jax.loading import formats
from realcustom_jax.loading.formats import CheckpointError
from realcustom_jax.loading.formats import Params
from realcustom_jax.loading.weights import check_unet_config
from realcustom_jax.loading.weights import DenoiserComponents
from realcustom_jax.loading.weights import load_denoiser
from realcustom_jax.loading.weights import load_text_encoder
from realcustom_jax.loading.weights import load_tokenizer


@dataclasses.dataclass
class SDXLComponents(DenoiserComponents):
  """The frozen parts of an SDXL pipeline, as Flax modules + params:
  `weights.DenoiserComponents` (its UNet builds our RealCustomUNet) and

  Attributes:
    text_encoder: `clip.CLIPTextModel` of text_encoder/.
    text_encoder_2: `clip.CLIPTextModel` of text_encoder_2/ (its projection, when the
      checkpoint has one, is kept apart in text_params).
    text_params: {'text_encoder': ..., 'text_encoder_2': ...[, 'text_projection':
      (c2, p) kernel]}, what `sdxl_text.encode` takes.
    tokenizer: CLIPTokenizer of tokenizer/.
    tokenizer_2: CLIPTokenizer of tokenizer_2/.
    scheduler_config: scheduler/scheduler_config.json as a dict; None when the
      directory has no scheduler/ (the release brings its own schedule).
  """
  text_encoder: clip.CLIPTextModel
  text_encoder_2: clip.CLIPTextModel
  text_params: Params = dataclasses.field(repr=False)
  tokenizer: CLIPTokenizer
  tokenizer_2: CLIPTokenizer
  scheduler_config: dict[str, Any] | None



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
  raw_unet = formats.read_json(unet_json)
  check_unet_config(raw_unet, unet_json, sdxl=True)

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
  denoiser = load_denoiser(path, allow_pickle, dtype, sdxl=True, default_scaling=0.13025)

  # ---- Scheduler (optional) ----
  sched_path = os.path.join(path, 'scheduler', 'scheduler_config.json')
  scheduler_config = formats.read_json(sched_path) if os.path.isfile(sched_path) else None

  return SDXLComponents(
      **denoiser, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
      text_params=text_params, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
      scheduler_config=scheduler_config)
