"""SDXL's text conditioning: two CLIP text encoders, read as the RealCustom release reads them.

The release (`models/text.py`, mode "penultimate_nonorm") runs each encoder on its own
tokens and keeps `hidden_states[-2]`, the output of the second-to-last layer WITHOUT the
final layer norm, concatenated along channels with `text_encoder/` first (SDXL: 768 +
1280 = 2048 = the UNet's cross_attention_dim). Its pooled embedding is the
`pooler_output` of `text_encoder_2/` loaded as a plain CLIPTextModel: the final-normed
hidden state at the end token, NOT passed through `text_projection`. diffusers' SDXL
pipeline feeds the projected one instead (CLIPTextModelWithProjection's `text_embeds`);
`project_pooled=True` gives that.

The size/crop micro-conditions (`time_ids`) complete SDXL's added conditioning.
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax import encoders

Array = jax.Array


def tokenize(tokenizer, tokenizer_2, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """Token ids for both encoders, each padded/truncated to its model length.

  The two tokenizers share SDXL's BPE but not the padding token (`tokenizer_2` pads
  with "!"), so the ids differ after the end token and the features there too.

  Returns:
    (ids, ids_2): int32 (B, 77) arrays (see `encoders.tokenize`).
  """
  return encoders.tokenize(tokenizer, prompts), encoders.tokenize(tokenizer_2, prompts)


def penultimate_nonorm(text_encoder, params, input_ids: Array) -> tuple[Array, Array]:
  """One encoder's release features: (hidden_states[-2] (B, L, c), pooler_output (B, c)).

  Args:
    text_encoder: `clip.CLIPTextModel`.
    params: its parameters.
    input_ids: int (B, L) token ids; no attention mask, as in the release.
  """
  out = text_encoder.apply({'params': params}, jnp.asarray(input_ids))
  return out.hidden_states[-2], out.pooled


def encode(text_encoder, text_encoder_2, params: dict[str, Any], input_ids: Array,
           input_ids_2: Array, project_pooled: bool = False) -> tuple[Array, Array]:
  """SDXL text features: the UNet's context and pooled `text_embeds`.

  Args:
    text_encoder: `clip.CLIPTextModel` of `text_encoder/` (CLIP ViT-L in SDXL).
    text_encoder_2: `clip.CLIPTextModel` of `text_encoder_2/` (OpenCLIP bigG in SDXL).
    params: {'text_encoder': ..., 'text_encoder_2': ..., and when the checkpoint has
      one, 'text_projection': (c2, p) kernel} (`sdxl_loading.SDXLComponents.text_params`).
    input_ids: (B, L) ids from `tokenizer/`.
    input_ids_2: (B, L) ids from `tokenizer_2/`.
    project_pooled: False: the release's unprojected pooled output; True: diffusers'
      SDXL pipeline's projected one.

  Returns:
    (context (B, L, c1 + c2), pooled (B, c2 or p)).

  Raises:
    ValueError: project_pooled without a text_projection in `params`.
  """
  if project_pooled and 'text_projection' not in params:
    raise ValueError('project_pooled=True needs text_encoder_2 weights with a '
                     'text_projection (a CLIPTextModelWithProjection checkpoint)')
  hidden, _ = penultimate_nonorm(text_encoder, params['text_encoder'], input_ids)
  hidden_2, pooled = penultimate_nonorm(text_encoder_2, params['text_encoder_2'], input_ids_2)
  if project_pooled:
    pooled = pooled @ params['text_projection'].astype(pooled.dtype)
  return jnp.concatenate([hidden, hidden_2], axis=-1), pooled


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int],
             target_size: tuple[int, int]) -> np.ndarray:
  """SDXL's micro-conditions as diffusers orders them: (h, w), (top, left), (h, w).

  Returns:
    float32 (6,) array; the UNet broadcasts it over the batch.
  """
  return np.array([*original_size, *crop_top_left, *target_size], np.float32)


def release_time_ids(height: int, width: int) -> np.ndarray:
  """The time ids the release's inference scripts pass for a (height, width) image.

  They fill the "original_height, original_width" and "target_height, target_width"
  slots with (width, height) (`inference_single_image.py`), the transpose of diffusers'
  order for non-square images; its weights were used that way, so this repeats it.
  """
  return time_ids((width, height), (0, 0), (width, height))
