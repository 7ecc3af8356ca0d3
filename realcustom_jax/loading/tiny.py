"""The embedded default: tiny random-init SD + CLIP components built in code.

Nothing is read from disk or downloaded. Every model gets host-drawn random weights from
a fixed seed that does not depend on `config.seed` (no init is compiled), so training
and sampling runs of the tiny config see the same frozen "pretrained" models.

Sizes come from `config.tiny` (`unet`, and optionally `vae`, `text`, `vision` dicts that
override the defaults below) and `config.resolution`.
"""
import json
import math
import os
import tempfile
from typing import Any

from diffusers import FlaxAutoencoderKL
import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTextConfig
from transformers import CLIPTokenizer
from transformers import CLIPVisionConfig

from realcustom_jax import clip
from realcustom_jax.loading import weights


# Whole words the tiny tokenizer knows as single tokens; anything else falls back to
# per-character BPE tokens (so "zebra" is a multi-token word in tests).
TINY_WORDS = (
    'a', 'an', 'the', 'on', 'in', 'of', 'with', 'at', 'and', 'photo', 'toy', 'dog',
    'cat', 'red', 'blue', 'green', 'circle', 'square', 'beach', 'teddy', 'bear', 'sks',
    'man', 'woman', 'park', 'grass', 'table', 'car', 'house', 'sitting', 'white',
    'background', 'picture',
)
BOS, EOS = '<|startoftext|>', '<|endoftext|>'

DEFAULT_VAE = dict(block_out_channels=(32, 32, 32), layers_per_block=1, latent_channels=4)
DEFAULT_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77)
DEFAULT_VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, image_size=32, patch_size=8)

# DDIM as Stable Diffusion 1.5 ships it (scheduler/scheduler_config.json).
SCHEDULER_CONFIG = dict(
    _class_name='DDIMScheduler', num_train_timesteps=1000, beta_start=0.00085,
    beta_end=0.012, beta_schedule='scaled_linear', trained_betas=None,
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    prediction_type='epsilon')

# eval_shape needs only the key's shape: a concrete PRNGKey would itself compile.
ABSTRACT_KEY = jax.ShapeDtypeStruct((2,), np.uint32)

# Fixed init seeds, one per model.
_UNET_SEED, _VAE_SEED, _TEXT_SEED, _VISION_SEED = 0, 1, 2, 3


def _section(config, name: str, default: dict[str, Any]) -> dict[str, Any]:
  tiny = config.tiny
  given = tiny.get(name, None) if hasattr(tiny, 'get') else getattr(tiny, name, None)
  out = dict(default)
  out.update(dict(given or {}))
  return out


def unet_config(config) -> dict[str, Any]:
  """The UNet config dict (`config.tiny.unet`)."""
  return dict(config.tiny.unet)


def vae_config(config) -> dict[str, Any]:
  """The AutoencoderKL config dict: `config.tiny.vae` over DEFAULT_VAE."""
  vae = _section(config, 'vae', DEFAULT_VAE)
  blocks = tuple(vae['block_out_channels'])
  if any(c % 32 for c in blocks):
    # diffusers' Flax VAE hard-codes GroupNorm(32).
    raise ValueError(f'config.tiny.vae block_out_channels {blocks} must be multiples of 32')
  factor = 2 ** (len(blocks) - 1)
  sample_size = config.tiny.unet['sample_size']
  if config.resolution != factor * sample_size:
    raise ValueError(
        f'config.resolution={config.resolution} must equal the VAE factor {factor} '
        f'(from {len(blocks)} VAE blocks) times config.tiny.unet sample_size={sample_size}')
  return vae_dict(blocks, vae['layers_per_block'], vae['latent_channels'],
                   config.resolution, scaling_factor=0.18215)


def vae_dict(blocks, layers_per_block: int, latent_channels: int, sample_size: int,
              scaling_factor: float) -> dict[str, Any]:
  """A diffusers AutoencoderKL config: one down and one up block per width in `blocks`."""
  return dict(
      in_channels=3, out_channels=3,
      down_block_types=('DownEncoderBlock2D',) * len(blocks),
      up_block_types=('UpDecoderBlock2D',) * len(blocks),
      block_out_channels=tuple(blocks), layers_per_block=layers_per_block,
      act_fn='silu', latent_channels=latent_channels, norm_num_groups=32,
      sample_size=sample_size, scaling_factor=scaling_factor)


def text_config(config, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
  """The CLIPTextConfig: `config.tiny.text` over DEFAULT_TEXT, ids from `tokenizer`."""
  text = _section(config, 'text', DEFAULT_TEXT)
  cross = config.tiny.unet['cross_attention_dim']
  if text['hidden_size'] != cross:
    raise ValueError(f'config.tiny.text hidden_size={text["hidden_size"]} must equal '
                     f'config.tiny.unet cross_attention_dim={cross}')
  return CLIPTextConfig(
      vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
      hidden_act='quick_gelu', **text)


def vision_config(config) -> CLIPVisionConfig:
  """The CLIPVisionConfig: `config.tiny.vision` over DEFAULT_VISION."""
  return CLIPVisionConfig(hidden_act='quick_gelu', **_section(config, 'vision', DEFAULT_VISION))


def build_tokenizer(words: tuple[str, ...] = TINY_WORDS) -> CLIPTokenizer:
  """A CLIP BPE tokenizer over printable ASCII plus `words` as whole-word tokens.

  Args:
    words: the whole words to add (default TINY_WORDS; the toy world passes its own).
  """
  chars = [chr(i) for i in range(33, 127)]
  vocab = chars + [c + '</w>' for c in chars]
  merges = []
  for word in dict.fromkeys(words):
    if len(word) == 1:
      continue
    # Build each word left to right; every intermediate piece is itself a token.
    piece = word[0]
    for i, c in enumerate(word[1:], start=1):
      c = c + '</w>' if i == len(word) - 1 else c
      merges.append(f'{piece} {c}')
      piece += c
      if piece not in vocab:
        vocab.append(piece)
  merges = list(dict.fromkeys(merges))
  vocab += [BOS, EOS]
  with tempfile.TemporaryDirectory() as d:
    with open(os.path.join(d, 'vocab.json'), 'w') as f:
      json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(d, 'merges.txt'), 'w') as f:
      f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    # The slow tokenizer reads both files into memory here, so the tempdir can go.
    return CLIPTokenizer(
        os.path.join(d, 'vocab.json'), os.path.join(d, 'merges.txt'),
        unk_token=EOS, bos_token=BOS, eos_token=EOS, pad_token=EOS, model_max_length=77)


def host_random_params(shapes: Any, seed: int) -> Any:
  """Random weights for a tree of shapes, drawn with NumPy: no init to trace or compile.

  Kernels and embeddings ~ N(0, 1/fan_in) (fan_in: the product of all but the last
  dimension), norm scales 1, biases 0: the scale of a standard init, which is all a
  random stand-in model needs.

  Args:
    shapes: a tree of arrays or ShapeDtypeStructs (e.g. from `jax.eval_shape(init)`).
    seed: NumPy seed; the same seed gives the same weights.

  Returns:
    The tree with device arrays of the same shapes and dtypes.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = getattr(path[-1], 'key', '')
    if name == 'scale':
      value = np.ones(leaf.shape, np.float32)
    elif name == 'bias':
      value = np.zeros(leaf.shape, np.float32)
    else:
      value = rng.standard_normal(leaf.shape, np.float32)
      value *= np.float32(1 / math.sqrt(math.prod(leaf.shape[:-1]) or 1))
    return jax.device_put(value.astype(leaf.dtype))

  return jax.tree_util.tree_map_with_path(fill, shapes)


def random_tower_in_flax_layout(module, seed: int) -> Any:
  """`host_random_params` for a `clip` tower, in transformers' Flax layout (what a
  `flax_model.msgpack` holds): the draws follow that tree's leaf order, so the tiny
  towers keep the weights they had as transformers' Flax CLIP."""
  shapes = clip.param_shapes(module)
  return host_random_params(clip.params_to_flax_layout(shapes, clip.tower_name(module)), seed)


def random_tower_params(module, seed: int) -> Any:
  """`random_tower_in_flax_layout` as the tower's own tree."""
  tree = clip.params_from_flax_layout(random_tower_in_flax_layout(module, seed),
                                      clip.tower_name(module), clip.param_shapes(module))
  return jax.tree.map(jnp.asarray, tree)


def build_tiny_components(config) -> tuple[weights.StableDiffusionComponents,
                                           weights.VisionEncoder]:
  """Builds the tiny random-init SD components and CLIP vision encoder.

  Args:
    config: the ml_collections config (`config.tiny`, `config.resolution`).

  Returns:
    (StableDiffusionComponents, VisionEncoder), identical on every call.
  """
  # Validate every section before spending time on any init.
  tokenizer = build_tokenizer()
  unet_cfg, vae_cfg = unet_config(config), vae_config(config)
  text_cfg, vision_cfg = text_config(config, tokenizer), vision_config(config)

  # Weights drawn on the host: jitting the four inits cost ~20 s of compiles on 2 cores,
  # every start of a CLI.
  # Imported where used: diffusers logs a deprecation notice when it loads.
  from diffusers import FlaxUNet2DConditionModel  # pylint: disable=g-import-not-at-top
  unet = FlaxUNet2DConditionModel.from_config(unet_cfg)
  unet_params = host_random_params(
      jax.eval_shape(unet.init_weights, ABSTRACT_KEY), _UNET_SEED)

  vae = FlaxAutoencoderKL.from_config(vae_cfg)
  vae_params = host_random_params(
      jax.eval_shape(vae.init_weights, ABSTRACT_KEY), _VAE_SEED)

  text_encoder = clip.CLIPTextModel(clip.CLIPConfig.from_dict(text_cfg))
  text_params = random_tower_params(text_encoder, _TEXT_SEED)
  vision_model = clip.CLIPVisionModel(clip.CLIPConfig.from_dict(vision_cfg))
  vision_params = random_tower_params(vision_model, _VISION_SEED)
  size = vision_cfg.image_size

  components = weights.StableDiffusionComponents(
      unet_config=unet_cfg,
      unet_params=unet_params,
      vae=vae,
      vae_params=vae_params,
      vae_scale_factor=2 ** (len(vae_cfg['block_out_channels']) - 1),
      scaling_factor=vae_cfg['scaling_factor'],
      text_encoder=text_encoder,
      text_params=text_params,
      tokenizer=tokenizer,
      scheduler_config=dict(SCHEDULER_CONFIG),
  )
  vision = weights.VisionEncoder(
      model=vision_model, params=vision_params, image_size=size, resize_size=size)
  return components, vision
