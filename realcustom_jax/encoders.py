"""Text and subject-image encoding: tokens, target-word positions, CLIP features.

The target word's token positions drive Eq. 11 (the influence-scope mask is the sum of
the cross-attention maps over ALL tokens of ALL occurrences of the word); the CLIP
image patch features are the visual tokens of Eqs. 3-10.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from realcustom_jax.loading import weights


def _check_prompts(prompts) -> list[str]:
  if isinstance(prompts, str) or not prompts:
    raise ValueError(f'prompts must be a non-empty list of strings, got {prompts!r}')
  for p in prompts:
    if not isinstance(p, str):
      raise ValueError(f'prompt {p!r} is not a string')
  return list(prompts)


def tokenize(tokenizer, prompts: list[str]) -> np.ndarray:
  """Tokenizes prompts to fixed-length ids, padded and truncated to the model length.

  Args:
    tokenizer: a CLIPTokenizer.
    prompts: the prompts.

  Returns:
    int32 array (B, tokenizer.model_max_length). A warning names every prompt that was
    longer than the limit and the text that was cut.
  """
  prompts = _check_prompts(prompts)
  length = tokenizer.model_max_length
  full = tokenizer(prompts, padding=False, truncation=False).input_ids
  for prompt, ids in zip(prompts, full):
    if len(ids) > length:
      cut = tokenizer.decode(ids[length - 1:-1])
      warnings.warn(f'prompt {prompt!r} is longer than {length} tokens; this part was '
                    f'cut: {cut!r}', stacklevel=2)
  ids = tokenizer(prompts, padding='max_length', max_length=length, truncation=True,
                  return_tensors='np').input_ids
  return ids.astype(np.int32)


def word_token_indices(tokenizer, prompt: str, word: str) -> list[int]:
  """Positions of every token of every whole-word occurrence of `word` in `prompt`.

  Positions index the tokenized prompt as the text encoder sees it, so the start token
  is position 0. Matching is case-insensitive (CLIP lowercases) and works for words
  that are several BPE tokens and for multi-word phrases ("teddy bear").

  Args:
    tokenizer: a CLIPTokenizer.
    prompt: the prompt.
    word: the target word or phrase.

  Returns:
    Sorted positions, all < model_max_length - 1 (the last slot holds the end token).

  Raises:
    ValueError: when the word does not occur in the prompt, or occurs only in the part
      cut by truncation.
  """
  if not isinstance(word, str) or not word.strip():
    raise ValueError(f'target word must be a non-empty string, got {word!r}')
  ids = tokenizer(prompt, padding=False, truncation=False).input_ids
  target = tokenizer(word, add_special_tokens=False).input_ids
  tokens = tokenizer.convert_ids_to_tokens(ids)
  end_of_word = tokenizer.convert_ids_to_tokens(target)[-1]
  if not end_of_word.endswith('</w>'):
    raise ValueError(f'target word {word!r} does not tokenize to whole words')
  n = len(target)
  found = []
  for start in range(1, len(ids) - n):
    # A match must begin a word: the token before it ends one (or is the start token).
    if ids[start:start + n] == target and (start == 1 or tokens[start - 1].endswith('</w>')):
      found.extend(range(start, start + n))
  if not found:
    raise ValueError(f'target word {word!r} does not occur in prompt {prompt!r}')
  limit = tokenizer.model_max_length - 1
  kept = [i for i in found if i < limit]
  if not kept:
    raise ValueError(
        f'target word {word!r} occurs in prompt {prompt!r} only after the '
        f'{tokenizer.model_max_length}-token limit, in the part cut by truncation')
  return kept


def word_token_weights(tokenizer, prompts: list[str], words: list[str]) -> np.ndarray:
  """One-hot-style weights marking the target word's tokens in each prompt.

  Args:
    tokenizer: a CLIPTokenizer.
    prompts: B prompts.
    words: B target words, one per prompt.

  Returns:
    float32 array (B, model_max_length): 1.0 at `word_token_indices`, 0 elsewhere.
  """
  prompts = _check_prompts(prompts)
  if isinstance(words, str) or len(words) != len(prompts):
    raise ValueError(f'need one target word per prompt: {len(prompts)} prompts, '
                     f'words={words!r}')
  out = np.zeros((len(prompts), tokenizer.model_max_length), np.float32)
  for row, (prompt, word) in enumerate(zip(prompts, words)):
    out[row, word_token_indices(tokenizer, prompt, word)] = 1.0
  return out


def encode_text(text_encoder, params, input_ids: jax.Array) -> jax.Array:
  """CLIP text features as Stable Diffusion uses them (SD 1.x and 2.x alike).

  Args:
    text_encoder: `clip.CLIPTextModel`.
    params: its parameters.
    input_ids: int (B, L) token ids from `tokenize`.

  Returns:
    (B, L, c_t) last hidden state (after the final layer norm), no attention mask,
    exactly as diffusers' pipelines encode prompts.
  """
  return text_encoder.apply({'params': params}, jnp.asarray(input_ids)).last_hidden_state


def preprocess_subject(images: list[Image.Image], vision: weights.VisionEncoder) -> np.ndarray:
  """CLIP image preprocessing as the vision model's preprocessor config says.

  Resize the shorter side to `vision.resize_size` (its resample filter), center crop
  to `vision.image_size`, scale to [0, 1], normalise with mean/std.

  Args:
    images: PIL images (any mode; converted to RGB).
    vision: the VisionEncoder whose settings to use.

  Returns:
    float32 array (B, 3, S, S), channels first as transformers' CLIP takes it
    (`image_features` hands the tower NHWC).
  """
  if isinstance(images, Image.Image) or not images:
    raise ValueError(f'images must be a non-empty list of PIL images, got {images!r}')
  size, crop = vision.resize_size, vision.image_size
  mean = np.asarray(vision.mean, np.float32)
  std = np.asarray(vision.std, np.float32)
  out = []
  for image in images:
    if not isinstance(image, Image.Image):
      raise ValueError(f'subject image {image!r} is not a PIL image')
    image = image.convert('RGB')
    w, h = image.size
    # transformers' CLIPImageProcessor: the shorter side becomes `size`, the other side
    # keeps the aspect ratio (truncated), then a centred crop.
    if w <= h:
      new_w, new_h = size, int(size * h / w)
    else:
      new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), resample=vision.resample)
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    if top < 0 or left < 0:
      raise ValueError(f'resize size {size} is smaller than the crop size {crop}')
    pixels = np.asarray(image, np.float32)[top:top + crop, left:left + crop] / 255.0
    out.append(((pixels - mean) / std).transpose(2, 0, 1))
  return np.stack(out).astype(np.float32)


def image_features(vision_model, params, pixel_values: jax.Array) -> jax.Array:
  """Subject patch features: the visual tokens f_i of Eqs. 3-10.

  Args:
    vision_model: `clip.CLIPVisionModel`.
    params: its parameters.
    pixel_values: float (B, 3, S, S) from `preprocess_subject`.

  Returns:
    (B, n_patches, c_i) hidden states of the penultimate encoder layer with the class
    token dropped and no final layer norm (as IP-Adapter-Plus and the authors use).
  """
  pixels = jnp.transpose(jnp.asarray(pixel_values), (0, 2, 3, 1))  # the tower takes NHWC
  return vision_model.apply({'params': params}, pixels).hidden_states[-2][:, 1:]
