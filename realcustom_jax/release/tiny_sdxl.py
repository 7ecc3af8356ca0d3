"""A tiny random SDXL directory on disk, in diffusers' layout and without torch: the
base of the tiny release (`release.tiny`) and of the SDXL loader's tests."""
import json
import os
from typing import Any

from diffusers import FlaxAutoencoderKL
import flax
import jax
import numpy as np
from transformers import CLIPTextConfig

from realcustom_jax import clip
from realcustom_jax.loading.tiny import ABSTRACT_KEY
from realcustom_jax.loading.tiny import build_tokenizer
from realcustom_jax.loading.tiny import host_random_params
from realcustom_jax.loading.tiny import random_tower_in_flax_layout
from realcustom_jax.loading.tiny import vae_dict

# SDXL's UNet shape at toy size: no attention in the first block, transformer depth
# growing with depth (SDXL: 1, 2, 10), 16-wide heads, linear projections, 'text_time'
# added conditioning over a 20-wide pooled embedding (text_encoder_2's width) + 6 ids.
SDXL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(32, 32, 64), layers_per_block=1, attention_head_dim=(2, 2, 4),
    transformer_layers_per_block=(1, 1, 2), cross_attention_dim=32,
    use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=20 + 6 * 8)
# SDXL: CLIP ViT-L (768 wide, quick_gelu), OpenCLIP bigG (1280, gelu, projection 1280).
SDXL_TEXT = dict(hidden_size=12, intermediate_size=24, hidden_act='quick_gelu')
SDXL_TEXT_2 = dict(hidden_size=20, intermediate_size=40, hidden_act='gelu', projection_dim=20)
SDXL_VAE = dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4)
SDXL_SCALING_FACTOR = 0.13025
# The scheduler SDXL base ships (scheduler/scheduler_config.json).
SDXL_SCHEDULER_CONFIG = dict(
    _class_name='EulerDiscreteScheduler', num_train_timesteps=1000, beta_start=0.00085,
    beta_end=0.012, beta_schedule='scaled_linear', trained_betas=None,
    prediction_type='epsilon', interpolation_type='linear', use_karras_sigmas=False,
    steps_offset=1, timestep_spacing='leading')


def _write_json(path: str, value: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)


def _write_msgpack(path: str, params: Any) -> None:
  with open(path, 'wb') as f:
    f.write(flax.serialization.to_bytes(params))


def _write_random_diffusers_model(directory: str, flax_cls, class_name: str,
                                  cfg: dict[str, Any], seed: int) -> None:
  """A diffusers model folder (config.json + diffusion_flax_model.msgpack) of random
  weights drawn on the host, as `from_pretrained` reads it."""
  model = flax_cls.from_config(cfg)
  _write_json(os.path.join(directory, 'config.json'), {'_class_name': class_name, **cfg})
  _write_msgpack(os.path.join(directory, 'diffusion_flax_model.msgpack'),
                 host_random_params(jax.eval_shape(model.init_weights, ABSTRACT_KEY), seed))


def write_tiny_sdxl(path: str, seed: int = 0, unet: dict[str, Any] | None = None) -> str:
  """Writes a tiny random SDXL directory in diffusers' layout, without torch.

  Folders unet/, vae/, text_encoder/ (CLIPTextModel), text_encoder_2/
  (CLIPTextModelWithProjection), tokenizer/, tokenizer_2/ (pads with "!", as SDXL's),
  scheduler/ and model_index.json, as `StableDiffusionXLPipeline.save_pretrained`
  lays them out; the weights are the libraries' Flax msgpack files
  (`diffusion_flax_model.msgpack`, `flax_model.msgpack`), drawn by `host_random_params`.

  Args:
    path: the directory to create (may exist).
    seed: NumPy seed of all weights.
    unet: the UNet config (default SDXL_UNET); its cross_attention_dim must be 32 and
      its pooled width 20 (the tiny text encoders').

  Returns:
    `path`.
  """
  path = os.fspath(path)
  unet_cfg = dict(unet or SDXL_UNET)
  seeds = np.random.default_rng(seed).integers(0, 2**31, size=4)

  # ---- UNet ----
  # Imported where used: diffusers logs a deprecation notice when it loads.
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  _write_random_diffusers_model(os.path.join(path, 'unet'), FlaxUNet2DConditionModel,
                                'UNet2DConditionModel', unet_cfg, int(seeds[0]))

  # ---- VAE ----
  blocks = SDXL_VAE['block_out_channels']
  vae_cfg = vae_dict(blocks, SDXL_VAE['layers_per_block'], SDXL_VAE['latent_channels'],
                      unet_cfg['sample_size'] * 2 ** (len(blocks) - 1), SDXL_SCALING_FACTOR)
  _write_random_diffusers_model(os.path.join(path, 'vae'), FlaxAutoencoderKL, 'AutoencoderKL',
                                vae_cfg, int(seeds[1]))

  # ---- Tokenizers and text encoders ----
  tokenizer = build_tokenizer()
  tokenizer.save_pretrained(os.path.join(path, 'tokenizer'))
  tokenizer_2 = build_tokenizer()
  tokenizer_2.pad_token = '!'
  tokenizer_2.save_pretrained(os.path.join(path, 'tokenizer_2'))
  for name, architecture, sizes, tok, s in (
      ('text_encoder', 'CLIPTextModel', SDXL_TEXT, tokenizer, seeds[2]),
      ('text_encoder_2', 'CLIPTextModelWithProjection', SDXL_TEXT_2, tokenizer_2, seeds[3])):
    text_cfg = CLIPTextConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, num_hidden_layers=3, num_attention_heads=2,
        max_position_embeddings=77, architectures=[architecture], **sizes)
    tower = clip.CLIPTextModel(clip.CLIPConfig.from_dict(
        text_cfg, with_projection=architecture.endswith('WithProjection')))
    text_cfg.save_pretrained(os.path.join(path, name))
    _write_msgpack(os.path.join(path, name, 'flax_model.msgpack'),
                   random_tower_in_flax_layout(tower, int(s)))

  # ---- Scheduler and pipeline index ----
  _write_json(os.path.join(path, 'scheduler', 'scheduler_config.json'), SDXL_SCHEDULER_CONFIG)
  _write_json(os.path.join(path, 'model_index.json'), {
      '_class_name': 'StableDiffusionXLPipeline',
      'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
      'text_encoder': ['transformers', 'CLIPTextModel'],
      'text_encoder_2': ['transformers', 'CLIPTextModelWithProjection'],
      'tokenizer': ['transformers', 'CLIPTokenizer'],
      'tokenizer_2': ['transformers', 'CLIPTokenizer'],
      'scheduler': ['diffusers', SDXL_SCHEDULER_CONFIG['_class_name']]})
  return path
