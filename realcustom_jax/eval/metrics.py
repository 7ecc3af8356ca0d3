"""CLIP-T, CLIP-I and DINO-I, the DreamBench similarity metrics of Sec. 4.1 / Table 1.

- CLIP-T: cosine of the CLIP ViT-B/32 text embedding of the prompt and the image
  embedding of the generated image.
- CLIP-I / DINO-I: cosine of generated vs real-subject image embeddings (CLIP ViT-B/32
  projected image features; DINO ViT-S/16 CLS token of `last_hidden_state`), averaged
  over all real images of the subject.

The paper segments the subject with SAM first. We ship no segmenter: pass a mask per
image (see `dreambench.mask_path`) and the background is filled with the encoder's
normalisation mean colour, i.e. exactly 0 after normalisation, before embedding.

Models are the project's Flax towers (`realcustom_jax.clip`, `eval.dino`: transformers 5
has no Flax) loaded torch-free from LOCAL directories in the transformers layout
(`model.safetensors` or `flax_model.msgpack`); nothing is downloaded. Image preprocessing
follows the directory's `preprocessor_config.json`.
"""
import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import transformers
from realcustom_jax import clip
from realcustom_jax.eval import dino
from realcustom_jax.loading import formats
from realcustom_jax.loading import tiny
from realcustom_jax.loading import weights

CLIP_MEAN, CLIP_STD = weights.CLIP_MEAN, weights.CLIP_STD
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_BATCH = 8  # images/texts per jitted call; batches are padded to it so one compile serves all


# ---- Metrics ----

def cosine(a, b, eps: float = 1e-8):
  """Cosine similarity over the last axis (broadcasting the others)."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), eps)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), eps)
  return jnp.sum(a * b, axis=-1)


def clip_t(prompt_emb, image_emb):
  """CLIP-T: cosine of prompt and generated-image CLIP embeddings.

  Args:
    prompt_emb: [..., D] text embeddings.
    image_emb: [..., D] image embeddings (same leading shape, or broadcastable).

  Returns:
    [...] cosines.
  """
  return cosine(prompt_emb, image_emb)


def mean_pairwise_cosine(gen_emb, real_emb):
  """Cosine of each generated embedding with each real one, averaged over the reals.

  Args:
    gen_emb: [G, D] generated-image embeddings.
    real_emb: [R, D] real-subject embeddings.

  Returns:
    [G] scores.
  """
  return jnp.mean(cosine(gen_emb[:, None, :], real_emb[None, :, :]), axis=1)


def clip_i(gen_emb, real_emb):
  """CLIP-I: `mean_pairwise_cosine` on CLIP image embeddings ([G, D], [R, D] -> [G])."""
  return mean_pairwise_cosine(gen_emb, real_emb)


def dino_i(gen_emb, real_emb):
  """DINO-I: `mean_pairwise_cosine` on DINO CLS embeddings ([G, D], [R, D] -> [G])."""
  return mean_pairwise_cosine(gen_emb, real_emb)


# ---- Preprocessing ----

def apply_mask(image: Image.Image, mask: np.ndarray | None,
               background: Sequence[float]) -> Image.Image:
  """Keeps the masked subject, fills the rest with `background` (RGB in [0, 1]).

  Args:
    image: RGB image.
    mask: [H, W] floats in [0, 1] at the image's size (soft masks blend), or None.
    background: fill colour; the encoder's mean so it normalises to 0.

  Returns:
    The composited RGB image.
  """
  if mask is None:
    return image
  x = np.asarray(image, np.float32)
  m = np.asarray(mask, np.float32)
  if m.shape != x.shape[:2]:
    raise ValueError(f'mask shape {m.shape} does not match image shape {x.shape[:2]}')
  bg = np.asarray(background, np.float32) * 255.0
  out = x * m[..., None] + bg * (1.0 - m[..., None])
  return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def _load_processor(path: str | None, default: Callable[[], Any]):
  if path and os.path.isfile(os.path.join(path, 'preprocessor_config.json')):
    # Slow (PIL/numpy) processors: the fast ones need torchvision.
    return transformers.AutoImageProcessor.from_pretrained(path, use_fast=False)
  return default()


def _check_weights(path: str) -> None:
  """Raises FileNotFoundError naming the directory when it holds no weights file."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: model directory not found')
  if os.path.isfile(os.path.join(path, 'flax_model.msgpack')):
    return
  if os.path.isfile(os.path.join(path, 'model.safetensors')):
    return
  raise FileNotFoundError(f'{path}: no flax_model.msgpack or model.safetensors')


def _batched(fn, params, x: np.ndarray) -> np.ndarray:
  """Runs jitted `fn(params, chunk)` over fixed-size padded chunks of `x`."""
  n = x.shape[0]
  out = []
  for i in range(0, n, _BATCH):
    chunk = x[i:i + _BATCH]
    pad = _BATCH - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)], axis=0)
    out.append(np.asarray(fn(params, chunk))[:_BATCH - pad])
  return np.concatenate(out, axis=0)


@dataclasses.dataclass
class _ImageEncoder:
  """Common image side: preprocessing, optional masks, batched jitted embedding."""
  model: Any
  params: Any
  processor: Any

  def __post_init__(self):
    self._image_fn = jax.jit(self._features)

  def _features(self, params, pixel_values):
    raise NotImplementedError

  @property
  def background(self) -> tuple[float, ...]:
    return tuple(self.processor.image_mean)

  def pixels(self, images: Sequence[Image.Image],
             masks: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Preprocesses RGB images (masked first when a mask is given) to [N, 3, H, W]."""
    masks = masks if masks is not None else [None] * len(images)
    images = [apply_mask(im.convert('RGB'), m, self.background)
              for im, m in zip(images, masks, strict=True)]
    return np.asarray(self.processor(images=images, return_tensors='np')['pixel_values'],
                      np.float32)

  def embed_images(self, images: Sequence[Image.Image],
                   masks: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """Embeds images (PIL, any size and mode).

    Args:
      images: the images.
      masks: optional [H, W] subject mask per image (None entries: no mask).

    Returns:
      [N, D] float32 embeddings (not normalised).
    """
    if not images:
      raise ValueError('embed_images: no images')
    return _batched(self._image_fn, self.params, self.pixels(images, masks))


@dataclasses.dataclass(frozen=True)
class ClipTowers:
  """A CLIPModel as the project's two towers, each with its projection."""
  text: clip.CLIPTextModel
  vision: clip.CLIPVisionModel


@dataclasses.dataclass
class ClipScorer(_ImageEncoder):
  """CLIP (`ClipTowers`, params {'text': ..., 'vision': ...}) + tokenizer + image
  processor; projected text and image features (CLIP-T, CLIP-I)."""
  tokenizer: Any = None

  def __post_init__(self):
    super().__post_init__()
    self._text_fn = jax.jit(lambda params, ids: self.model.text.apply(
        {'params': params['text']}, ids).embeds)
    self.max_length = min(int(self.tokenizer.model_max_length),
                          int(self.model.text.config.max_position_embeddings))

  def _features(self, params, pixel_values):
    pixels = jnp.transpose(pixel_values, (0, 2, 3, 1))  # the processor's NCHW -> NHWC
    return self.model.vision.apply({'params': params['vision']}, pixels).embeds

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
    """Embeds prompts: [N] strings -> [N, D] projected text features."""
    if not texts:
      raise ValueError('embed_texts: no texts')
    # Padding to a fixed length keeps one compile; CLIP pools at the EOS token, so
    # trailing pad tokens do not change the result.
    ids = self.tokenizer(list(texts), padding='max_length', truncation=True,
                         max_length=self.max_length, return_tensors='np')['input_ids']
    return _batched(self._text_fn, self.params, ids.astype(np.int32))


@dataclasses.dataclass
class DinoScorer(_ImageEncoder):
  """DINO ViT (`dino.ViTModel`); the embedding is the CLS token of `last_hidden_state`."""

  def _features(self, params, pixel_values):
    pixels = jnp.transpose(pixel_values, (0, 2, 3, 1))  # the processor's NCHW -> NHWC
    return self.model.apply({'params': params}, pixels)[:, 0]


def load_clip(path: str) -> ClipScorer:
  """Loads a local CLIP directory (e.g. openai/clip-vit-base-patch32 saved to disk).

  Args:
    path: directory with config.json, model.safetensors or flax_model.msgpack, the
      tokenizer files, and optionally preprocessor_config.json (default: CLIP mean/std,
      resize + center crop to the model's image size).

  Returns:
    A `ClipScorer`.
  """
  _check_weights(path)
  model = _clip_towers(transformers.CLIPConfig.from_pretrained(path))
  params = {'text': weights.load_clip_params(model.text, path, False, jnp.float32),
            'vision': weights.load_clip_params(model.vision, path, False, jnp.float32)}
  try:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(path)
  except (OSError, ValueError, TypeError) as e:
    raise FileNotFoundError(f'{path}: no usable CLIP tokenizer files ({e})') from None
  size = model.vision.config.image_size
  processor = _load_processor(path, lambda: transformers.CLIPImageProcessor(
      size={'shortest_edge': size}, crop_size={'height': size, 'width': size},
      image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)))
  return ClipScorer(model=model, params=params, processor=processor, tokenizer=tokenizer)


def _clip_towers(config) -> ClipTowers:
  """transformers' CLIPConfig as the two projected towers."""
  def tower(sub):
    return clip.CLIPConfig.from_dict(dict(sub.to_dict(), projection_dim=config.projection_dim),
                                     with_projection=True)
  return ClipTowers(clip.CLIPTextModel(tower(config.text_config)),
                    clip.CLIPVisionModel(tower(config.vision_config)))


def load_dino(path: str) -> DinoScorer:
  """Loads a local DINO ViT directory (e.g. facebook/dino-vits16 saved to disk).

  Args:
    path: directory with config.json, model.safetensors or flax_model.msgpack, and
      optionally preprocessor_config.json (default: ImageNet mean/std, resize to the
      model's image size, 224 for ViT-S/16).

  Returns:
    A `DinoScorer`.
  """
  _check_weights(path)
  model = dino.ViTModel(dino.config_from_dict(formats.read_json(
      os.path.join(path, 'config.json'))))
  shapes = clip.param_shapes(model)
  params = weights.load_transformers_weights(
      path, shapes, lambda state: dino.params_from_torch_state(state, shapes),
      lambda tree: dino.params_from_flax_layout(tree, shapes), False, None)
  processor = _load_processor(path, lambda: _dino_processor(model.config.image_size))
  return DinoScorer(model=model, params=params, processor=processor)


def _dino_processor(size: int):
  return transformers.ViTImageProcessor(
      size={'height': size, 'width': size}, image_mean=list(IMAGENET_MEAN),
      image_std=list(IMAGENET_STD), resample=Image.Resampling.BICUBIC)


# ---- Tiny random models (used when no model directory is configured) ----

def tiny_clip_config(tokenizer: transformers.CLIPTokenizer) -> transformers.CLIPConfig:
  """Two-layer CLIP, width 32, 32 px images in 8 px patches, over `tokenizer`'s vocab.

  `tokenizer` is `tiny.build_tokenizer()`, whose end token has the highest id, as Flax
  CLIP's pooling expects when eos_token_id is the legacy 2.
  """
  text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=tokenizer.model_max_length,
              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id)
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, image_size=32, patch_size=8)
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


def tiny_dino_config() -> transformers.ViTConfig:
  """Two-layer ViT, width 32, 32 px images in 8 px patches."""
  # initializer_range 1: LeCun-normal kernels; the default 0.02 makes every image's CLS
  # token nearly the same, which would hide plumbing bugs from the tests.
  return transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, image_size=32, patch_size=8,
                                initializer_range=1.0)


def _lecun_reinit(params, seed: int):
  """Redraws kernels and embeddings with std 1/sqrt(fan_in).

  CLIP's init scales are tiny (normal 0.02); in a random model every image then maps to
  almost the same embedding.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  out = []
  for (path, x), key in zip(leaves, keys):
    name = str(path[-1])
    if 'kernel' in name or 'embedding' in name:
      fan_in = int(np.prod(x.shape[:-1])) if x.ndim > 1 else x.shape[-1]
      x = jax.random.normal(key, x.shape, x.dtype) / np.sqrt(max(fan_in, 1))
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def tiny_clip(seed: int = 0) -> ClipScorer:
  """Random-init tiny CLIP with a fixed seed (plumbing checks only, scores meaningless)."""
  tokenizer = tiny.build_tokenizer()
  config = tiny_clip_config(tokenizer)
  model = _clip_towers(config)
  params = _lecun_reinit({'text': clip.init_params(model.text, jax.random.PRNGKey(seed)),
                          'vision': clip.init_params(model.vision, jax.random.PRNGKey(seed))},
                         seed)
  size = config.vision_config.image_size
  processor = transformers.CLIPImageProcessor(
      size={'shortest_edge': size}, crop_size={'height': size, 'width': size})
  return ClipScorer(model=model, params=params, processor=processor, tokenizer=tokenizer)


def tiny_dino(seed: int = 0) -> DinoScorer:
  """Random-init tiny DINO ViT with a fixed seed (plumbing checks only)."""
  config = tiny_dino_config()
  model = dino.ViTModel(dino.config_from_dict(config.to_dict()))
  params = _lecun_reinit(clip.init_params(model, jax.random.PRNGKey(seed)), seed)
  return DinoScorer(model=model, params=params, processor=_dino_processor(config.image_size))
