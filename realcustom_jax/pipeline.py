"""RealCustom text-to-image customization pipeline: encoders, jitted sampler, VAE.

  pipe = RealCustomPipeline.from_config(config)       # tiny embedded default or local SD
  pipe = RealCustomPipeline.from_pretrained(sd_dir, clip_dir)   # the paper's settings
  # the authors' released SDXL weights (realcustom_jax.release_pipeline):
  pipe = RealCustomPipeline.from_pretrained(sdxl_dir, vision_dir, 'realcustom_highres.safetensors')
  out = pipe([subject], ['a toy on the beach'], ['toy'], seed=0, return_masks=True)
  out.images[0].save('out.png'); save_mask_grid(out, 'grid.png')

Each stage (text encoder, vision encoder, sampler scan, VAE decoder) is jitted; jax.jit
caches one executable per input shape, so repeated calls with the same batch size and
step count compile nothing.
"""
import dataclasses
import json
import logging
from typing import Optional, Sequence
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import components as components_lib
from realcustom_jax import encoders
from realcustom_jax import model as model_lib
from realcustom_jax import sampler
from realcustom_jax import weights

# A fixed key for the untrained adapter's random parts (scoring, visual projection).
_ADAPTER_INIT_SEED = 0


@dataclasses.dataclass
class RealCustomOutput:
  """What the pipeline returns.

  Attributes:
    images: B generated PIL RGB images.
    masks: (steps, B, H, W) float32 influence scope at every step (return_masks).
    x0: (steps, B, res, res, 3) uint8 decoded x0 prediction at every step (return_masks).
  """
  images: list[Image.Image]
  masks: Optional[np.ndarray] = None
  x0: Optional[np.ndarray] = None


def paper_config(components: weights.StableDiffusionComponents) -> ml_collections.ConfigDict:
  """The paper's settings (Sec. 4.1) for weights given without a config.

  DDIM 50 steps, w_t 7.5, w_i 12.5, gamma_scope 0.25, gamma_num 0.8 (what
  configs/laion.py sets); the resolution is the UNet's sample size times the VAE factor
  (512 px for SD 1.5); the UNet computes in bfloat16 on accelerators and float32 on
  CPU (where XLA's bfloat16 is slow); the model keys take `model.build_model`'s
  defaults.
  """
  paper = sampler.GuidanceSettings()  # the class defaults are the paper's values
  return ml_collections.ConfigDict({
      'resolution': int(components.unet_config.get('sample_size', 64)
                        * components.vae_scale_factor),
      'model': dict(model_lib.DEFAULT_MODEL_CONFIG,
                    dtype='float32' if jax.default_backend() == 'cpu' else 'bfloat16'),
      'sampler': dict(num_steps=sampler.PAPER_NUM_STEPS, guidance_text=paper.guidance_text,
                      guidance_image=paper.guidance_image, gamma_scope=paper.gamma_scope,
                      gamma_num=paper.gamma_num, binary_mask=False),
  })


def _read_adapter(path: Optional[str]) -> tuple[Optional[dict], dict]:
  """The adapter tree and the training `config.model` stored with it (empty if none)."""
  if not path:
    return None, {}
  metadata = weights.load_adapter_metadata(path)
  adapter_lib.check_layout(metadata.get('adapter_layout'), f'adapter file {path}')
  trained = json.loads(metadata['model_config']) if 'model_config' in metadata else {}
  return weights.load_adapter(path), trained


def _check_adapter_config(trained: dict, config) -> None:
  """ValueError when the adapter was trained with a different scoring set-up.

  The tree shapes cannot tell an Eq. 8 fusion ablation ('text', 'mean', ...) from the
  default, so the training config that `train.export` stores is compared here.
  """
  defaults = {'scoring': 'adaptive'}  # files from before the key existed
  for key in ('fusion', 'scoring_hidden', 'scoring'):
    if key in trained and trained[key] != config.model.get(key, defaults.get(key)):
      raise ValueError(f'the adapter was trained with model.{key}={trained[key]!r} but the '
                       f'config has {config.model.get(key)!r}; set '
                       f'--config.model.{key}={trained[key]}')


def vae_decoder(vae, scaling_factor: float):
  """A jitted (vae_params, latents) -> (B, H, W, 3) uint8 images function (SD and SDXL)."""
  def decode(p, latents):
    x = vae.apply({'params': p}, latents / scaling_factor, method=vae.decode).sample
    # [-1, 1] NCHW -> [0, 255] NHWC uint8, on device.
    x = jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(x, (0, 2, 3, 1)) * 255).astype(jnp.uint8)
  return jax.jit(decode)


def check_batch(subjects, prompts, words) -> int:
  """The batch size B of a pipeline call; ValueError for lists that do not pair up."""
  for name, value in (('subjects', subjects), ('prompts', prompts), ('words', words)):
    if isinstance(value, (str, Image.Image)) or not isinstance(value, Sequence) or not value:
      raise ValueError(f'{name} must be a non-empty list, got {value!r}')
  b = len(prompts)
  if len(words) != b:
    raise ValueError(f'need one word per prompt: {b} prompts, {len(words)} words')
  if len(subjects) not in (1, b):
    raise ValueError(f'need one subject, or one per prompt: {b} prompts, '
                     f'{len(subjects)} subjects')
  return b


def is_release_config(config) -> bool:
  """Whether `config` is for the authors' release (configs/release.py)."""
  return config is not None and config.get('pipeline', 'paper') == 'release'


def _is_release_adapter(path: Optional[str]) -> bool:
  return bool(path) and weights.load_adapter_metadata(path).get(
      'adapter_kind') == adapter_lib.RELEASE_KIND


class RealCustomPipeline:
  """Frozen SD + CLIP components, the RealCustom adapter and the jitted sampler.

  Attributes:
    model: the RealCustom module.
    params: its full parameter tree (base UNet merged with the adapter).
    components: the Stable Diffusion components (VAE, text encoder, tokenizer, ...).
    vision: the CLIP vision encoder.
    config: the config (`config.sampler` gives the defaults of `__call__`).
    resolution: output image side in pixels.
  """

  def __init__(self, components: weights.StableDiffusionComponents,
               vision: weights.VisionEncoder, config=None, adapter_params=None,
               adapter_config: Optional[dict] = None):
    """Builds the pipeline; `adapter_params=None` starts an untrained adapter (warned).

    Args:
      components: the loaded (or tiny) Stable Diffusion components.
      vision: the CLIP vision encoder.
      config: the ml_collections config; None: the paper's settings (`paper_config`:
        50 DDIM steps, w_t 7.5, w_i 12.5, gamma_scope 0.25, gamma_num 0.8).
      adapter_params: the trained adapter tree (scoring, visual_proj, visual K/V), as
        `weights.load_adapter` returns it.
      adapter_config: the `config.model` the adapter was trained with (stored by
        `train.export`); a different fusion or score-net width is refused.
    """
    if config is None:
      config = paper_config(components)
    self.config = config
    self.components = components
    self.vision = vision
    self.resolution = int(config.resolution)
    factor = components.vae_scale_factor
    if self.resolution % factor:
      raise ValueError(f'resolution {self.resolution} is not a multiple of the VAE factor '
                       f'{factor}')
    self.latent_size = self.resolution // factor
    self.model = model_lib.build_model(config, components.unet_config)
    _check_adapter_config(adapter_config or {}, config)
    self._check_latent_size()
    self.params = self._full_params(adapter_params)
    self._encode_text = jax.jit(
        lambda p, ids: encoders.encode_text(components.text_encoder, p, ids))
    self._encode_image = jax.jit(
        lambda p, px: encoders.image_features(vision.model, p, px))
    self._decode = vae_decoder(components.vae, components.scaling_factor)

  # ---- Constructors ----

  @classmethod
  def tiny(cls, config, adapter_path: Optional[str] = None) -> 'RealCustomPipeline':
    """The embedded default: tiny random SD + CLIP built in code.

    Args:
      config: the config, e.g. configs/tiny.py's `get_config()` (its `tiny` section
        gives the model sizes).
      adapter_path: optional adapter file; None: untrained adapter (warned).
    """
    from realcustom_jax import tiny as tiny_lib  # pylint: disable=g-import-not-at-top
    components, vision = tiny_lib.build_tiny_components(config)
    adapter_params, trained = _read_adapter(adapter_path)
    return cls(components, vision, config, adapter_params, trained)

  @classmethod
  def from_pretrained(cls, sd_dir: str, vision_dir: str, adapter_path: Optional[str] = None,
                      config=None, allow_pickle: bool = False) -> 'RealCustomPipeline':
    """Loads a local diffusers SD directory, a CLIP vision directory and an adapter.

    Args:
      sd_dir: diffusers-format Stable Diffusion 1.x/2.x directory.
      vision_dir: transformers CLIP vision model directory.
      adapter_path: `.safetensors` file from `weights.save_adapter`; None: an untrained
        adapter (visual K/V copied from the text K/V), with a warning.
      config: see `__init__` (None: the paper's settings).
      allow_pickle: accept torch `.bin` weights (unpickling runs code).

    Returns:
      The pipeline; a `release_pipeline.ReleasePipeline` when the adapter is the
      authors' converted release (then `sd_dir` is SDXL and `vision_dir` holds the two
      timm ViTs) or the config is a release config.

    Raises:
      ValueError: a release adapter with a paper config, or the other way round.
    """
    if is_release_config(config) or (config is None and _is_release_adapter(adapter_path)):
      from realcustom_jax import release_pipeline  # pylint: disable=g-import-not-at-top
      return release_pipeline.ReleasePipeline.from_pretrained(
          sd_dir, vision_dir, adapter_path, config, allow_pickle)
    components = weights.load_stable_diffusion(sd_dir, allow_pickle=allow_pickle)
    vision = weights.load_vision_encoder(vision_dir, allow_pickle=allow_pickle)
    adapter_params, trained = _read_adapter(adapter_path)
    return cls(components, vision, config, adapter_params, trained)

  @classmethod
  def from_config(cls, config) -> 'RealCustomPipeline':
    """The models `config` names (`components.load_components`: tiny when
    `config.pretrained` is empty) with `config.adapter`; a release config
    (`config.pipeline == 'release'`) gives a `release_pipeline.ReleasePipeline`."""
    if is_release_config(config):
      from realcustom_jax import release_pipeline  # pylint: disable=g-import-not-at-top
      return release_pipeline.ReleasePipeline.from_config(config)
    components, vision = components_lib.load_components(config)
    adapter_params, trained = _read_adapter(config.get('adapter', '') or None)
    return cls(components, vision, config, adapter_params, trained)

  # ---- Parameters ----

  def _check_latent_size(self) -> None:
    unet = self.model.unet
    down = 2 ** (len(unet.block_out_channels) - 1)
    if self.latent_size % down:
      raise ValueError(f'latent size {self.latent_size} (resolution {self.resolution}) '
                       f'must be a multiple of the UNet downsampling factor {down}')

  def _init_shapes(self):
    return ((4, self.latent_size, self.latent_size),
            self.components.tokenizer.model_max_length, self.vision.num_patches,
            self.vision.hidden_size)

  def _random_adapter(self) -> dict:
    """An untrained adapter: random scoring/projection, visual K/V = text K/V."""
    return model_lib.init_adapter_params(
        self.model, jax.random.PRNGKey(_ADAPTER_INIT_SEED), *self._init_shapes())

  def _full_params(self, adapter_params) -> dict:
    base = {'unet': self.components.unet_params}
    if adapter_params is None:
      warnings.warn('no adapter given: using an UNTRAINED adapter (visual K/V copied from '
                    'the text K/V, random scoring module); outputs will not follow the '
                    'subject', stacklevel=3)
      return adapter_lib.init_visual_kv_from_text(
          adapter_lib.merge_params(base, self._random_adapter()))
    expected = model_lib.param_shapes(self.model, *self._init_shapes())
    _, expected_adapter = adapter_lib.split_params(expected)
    adapter_lib.check_tree_fits(adapter_params, expected_adapter, 'adapter')
    adapter_params = jax.tree_util.tree_map(jnp.asarray, adapter_params)
    return adapter_lib.merge_params(base, adapter_params)

  @property
  def adapter_params(self) -> dict:
    """The adapter part of `params` (what `weights.save_adapter` writes)."""
    return adapter_lib.split_params(self.params)[1]

  # ---- Generation ----

  def _settings(self, num_steps, guidance_text, guidance_image, gamma_scope,
                gamma_num) -> tuple[int, sampler.GuidanceSettings]:
    """(num_steps, checked GuidanceSettings): the arguments given, else config.sampler."""
    num_steps = self.config.sampler.num_steps if num_steps is None else num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
      raise ValueError(f'num_steps must be a positive integer, got {num_steps!r}')
    settings = sampler.GuidanceSettings.from_config(
        self.config.sampler, guidance_text=guidance_text, guidance_image=guidance_image,
        gamma_scope=gamma_scope, gamma_num=gamma_num)
    return int(num_steps), settings

  def encode_prompts(self, prompts: Sequence[str], words: Sequence[str]):
    """Text features, empty-prompt features and word weights for B prompts.

    Returns:
      (text (B, L, c_t), uncond (B, L, c_t), word weights (B, L)).

    Raises:
      ValueError: a word not in its prompt (names both), or only in the truncated part.
    """
    tokenizer = self.components.tokenizer
    word_weights = encoders.word_token_weights(tokenizer, list(prompts), list(words))
    ids = encoders.tokenize(tokenizer, list(prompts))
    uncond_ids = encoders.tokenize(tokenizer, [''])
    text = self._encode_text(self.components.text_params, jnp.asarray(ids))
    uncond = self._encode_text(self.components.text_params, jnp.asarray(uncond_ids))
    uncond = jnp.broadcast_to(uncond, text.shape)
    return text, uncond, jnp.asarray(word_weights)

  def encode_subjects(self, subjects: Sequence[Image.Image], batch: int) -> jax.Array:
    """(batch, n_i, c_i) CLIP patch features; one subject is shared by every row."""
    pixels = encoders.preprocess_subject(list(subjects), self.vision)
    feats = self._encode_image(self.vision.params, jnp.asarray(pixels))
    return jnp.broadcast_to(feats, (batch,) + feats.shape[1:])

  def initial_latents(self, seed: int, batch: int) -> jax.Array:
    """z_T ~ N(0, 1) at the latent size (DDIM's init_noise_sigma is 1)."""
    shape = (batch, self.model.unet.in_channels, self.latent_size, self.latent_size)
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)

  def decode(self, latents: jax.Array) -> np.ndarray:
    """(B, C, h, w) latents -> (B, res, res, 3) uint8."""
    return np.asarray(self._decode(self.components.vae_params, latents))

  def __call__(self, subjects: Sequence[Image.Image], prompts: Sequence[str],
               words: Sequence[str], *, seed: int = 0, num_steps: Optional[int] = None,
               guidance_text: Optional[float] = None, guidance_image: Optional[float] = None,
               gamma_scope: Optional[float] = None, gamma_num: Optional[float] = None,
               return_masks: bool = False) -> RealCustomOutput:
    """Generates one image per (subject, prompt, word) triple.

    Args:
      subjects: B subject images, or one shared by every prompt.
      prompts: B prompts.
      words: B target words, each occurring in its prompt.
      seed: PRNG seed of z_T.
      num_steps: DDIM steps (default config.sampler.num_steps).
      guidance_text: w_t of Eq. 13 (default config.sampler.guidance_text).
      guidance_image: w_i of Eq. 13 (default config.sampler.guidance_image).
      gamma_scope: Eq. 11 ratio in [0, 1] (default config.sampler.gamma_scope).
      gamma_num: Eq. 10 ratio in [0, 1] (default config.sampler.gamma_num).
      return_masks: also return every step's scope and decoded x0 prediction.

    Returns:
      RealCustomOutput.

    Raises:
      ValueError: (before any tracing) for lists of different lengths, a word not in
        its prompt, a gamma outside [0, 1] or a bad step count.
    """
    b = check_batch(subjects, prompts, words)
    num_steps, settings = self._settings(num_steps, guidance_text, guidance_image,
                                         gamma_scope, gamma_num)

    text, uncond, word_weights = self.encode_prompts(prompts, words)
    feats = self.encode_subjects(subjects, b)
    schedule = sampler.ddim_schedule(self.components.scheduler_config, num_steps)
    latents = self.initial_latents(seed, b) * schedule.init_noise_sigma
    logging.info('sampling %d image(s), %d DDIM steps', b, num_steps)
    out = sampler.sample(self.model, self.params, schedule, latents, text, uncond, feats,
                         word_weights, settings, return_trajectory=return_masks)
    jax.block_until_ready(out.latents)
    logging.info('decoding with the VAE')
    images = [Image.fromarray(x) for x in self.decode(out.latents)]
    if not return_masks:
      return RealCustomOutput(images)
    # One decode call per step: the same shape, so one compile, and bounded memory.
    x0 = np.stack([self.decode(out.x0[s]) for s in range(num_steps)])
    return RealCustomOutput(images, np.asarray(out.masks), x0)


def save_mask_grid(output: RealCustomOutput, path: str, steps: Optional[Sequence[int]] = None,
                   index: int = 0, columns: int = 5) -> None:
  """Writes a Fig. 6-style picture: the scope (grey, upsampled) above the x0 prediction.

  Args:
    output: a pipeline output made with `return_masks=True`.
    path: the image file to write (e.g. .png).
    steps: which steps to show; default `columns` steps evenly spaced, last included.
    index: which batch row.
    columns: number of steps when `steps` is None.

  Raises:
    ValueError: without masks, or for a step / row out of range.
  """
  if output.masks is None or output.x0 is None:
    raise ValueError('the output has no masks: call the pipeline with return_masks=True')
  n_steps, batch = output.masks.shape[:2]
  if not 0 <= index < batch:
    raise ValueError(f'row {index} out of range for batch {batch}')
  if steps is None:
    steps = sorted({int(round(s)) for s in np.linspace(0, n_steps - 1, min(columns, n_steps))})
  for s in steps:
    if not 0 <= s < n_steps:
      raise ValueError(f'step {s} out of range for {n_steps} steps')
  size = output.x0.shape[2]
  tile = max(size, 64)  # tiny outputs are upscaled so the grid stays legible
  grid = Image.new('RGB', (tile * len(steps), 2 * tile), 'white')
  for col, s in enumerate(steps):
    mask = np.clip(output.masks[s, index], 0.0, 1.0)
    mask_img = Image.fromarray(np.round(mask * 255).astype(np.uint8), 'L').resize(
        (tile, tile), Image.Resampling.NEAREST).convert('RGB')
    x0_img = Image.fromarray(output.x0[s, index]).resize((tile, tile),
                                                         Image.Resampling.BILINEAR)
    grid.paste(mask_img, (col * tile, 0))
    grid.paste(x0_img, (col * tile, tile))
  grid.save(path)
