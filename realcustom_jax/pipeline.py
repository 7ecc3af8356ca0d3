"""The paper's RealCustom pipeline (SD 1.x / 2.x + CLIP): encoders, jitted sampler, VAE.

  pipe = RealCustomPipeline.from_config(config)       # tiny embedded default or local SD
  pipe = RealCustomPipeline.from_pretrained(sd_dir, clip_dir, 'adapter.safetensors')
  out = pipe([subject], ['a toy on the beach'], ['toy'], seed=0, return_masks=True)
  out.images[0].save('out.png'); pipeline_common.save_mask_grid(out, 'grid.png')

`realcustom_jax.pipelines.load_pipeline` picks this or the authors' release pipeline
(`realcustom_jax.release.pipeline`) from a config or an adapter file.

Each stage (text encoder, vision encoder, sampler scan, VAE decoder) is jitted; jax.jit
caches one executable per input shape, so repeated calls with the same batch size and
step count compile nothing.
"""
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
from realcustom_jax import encoders
from realcustom_jax import model as model_lib
from realcustom_jax import pipeline_common
from realcustom_jax import sampler
from realcustom_jax import schedules
from realcustom_jax.loading import components as components_lib
from realcustom_jax.loading import weights
from realcustom_jax.pipeline_common import RealCustomOutput

# A fixed key for the untrained adapter's random parts (scoring, visual projection).
_ADAPTER_INIT_SEED = 0


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
  params, metadata = adapter_lib.read_adapter(path, adapter_lib.PAPER_KIND)
  return params, json.loads(metadata.get('model_config', '{}'))


def _check_adapter_config(trained: dict, config) -> None:
  """ValueError when the adapter was trained with a different scoring set-up.

  The tree shapes cannot tell an Eq. 8 fusion ablation ('text', 'mean', ...) from the
  default, so the training config that `train.export` stores is compared here.
  """
  if not trained:  # no stored training config (a random adapter, an old file)
    return
  # Files from before a key existed were trained with its default.
  defaults = {k: model_lib.DEFAULT_MODEL_CONFIG[k] for k in ('scoring', 'score_normalization')}
  for key in ('fusion', 'scoring_hidden', 'scoring', 'score_normalization'):
    if key not in trained and key not in defaults:
      continue
    used = trained.get(key, defaults.get(key))
    if used != config.model.get(key, defaults.get(key)):
      raise ValueError(f'the adapter was trained with model.{key}={used!r} but the '
                       f'config has {config.model.get(key)!r}; set '
                       f'--config.model.{key}={used}')


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
        `adapter.read_adapter` returns it.
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
    self._decode = pipeline_common.vae_decoder(components.vae, components.scaling_factor)

  # ---- Constructors ----

  @classmethod
  def from_pretrained(cls, sd_dir: str, vision_dir: str, adapter_path: Optional[str] = None,
                      config=None, allow_pickle: bool = False) -> 'RealCustomPipeline':
    """Loads a local diffusers SD directory, a CLIP vision directory and an adapter.

    Args:
      sd_dir: diffusers-format Stable Diffusion 1.x/2.x directory.
      vision_dir: transformers CLIP vision model directory.
      adapter_path: `.safetensors` file from `train.export` (`adapter.save_adapter`);
        None: an untrained adapter (visual K/V copied from the text K/V), with a warning.
      config: see `__init__` (None: the paper's settings).
      allow_pickle: accept torch `.bin` weights (unpickling runs code).

    Raises:
      ValueError: (one line) unreadable weights, or an adapter that is not a paper
        adapter (the authors' release: `pipelines.load_pipeline`).
    """
    adapter_params, trained = _read_adapter(adapter_path)
    components = weights.load_stable_diffusion(sd_dir, allow_pickle=allow_pickle)
    vision = weights.load_vision_encoder(vision_dir, allow_pickle=allow_pickle)
    return cls(components, vision, config, adapter_params, trained)

  @classmethod
  def from_config(cls, config) -> 'RealCustomPipeline':
    """The models `config` names (`components.load_components`: the tiny random ones
    when `config.pretrained` is empty) with the adapter `config.adapter` names."""
    adapter_params, trained = _read_adapter(config.get('adapter', '') or None)
    components, vision = components_lib.load_components(config)
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
    """The adapter part of `params` (what `adapter.save_adapter` writes)."""
    return adapter_lib.split_params(self.params)[1]

  # ---- Generation ----

  def settings(self, guidance_text=None, guidance_image=None, gamma_scope=None,
               gamma_num=None) -> sampler.GuidanceSettings:
    """Checked GuidanceSettings: the values given, else `config.sampler`'s."""
    return sampler.GuidanceSettings.from_config(
        self.config.sampler, guidance_text=guidance_text, guidance_image=guidance_image,
        gamma_scope=gamma_scope, gamma_num=gamma_num)

  def check_word(self, prompt: str, word: str) -> None:
    """ValueError (one line) unless the tokenizer finds `word` as whole tokens of `prompt`."""
    encoders.word_token_indices(self.components.tokenizer, prompt, word)

  def schedule(self, num_steps: Optional[int] = None) -> schedules.Schedule:
    """The DDIM schedule of `num_steps` steps (default `config.sampler.num_steps`)."""
    num_steps = self.config.sampler.num_steps if num_steps is None else num_steps
    return schedules.ddim_schedule(self.components.scheduler_config, num_steps)

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

  def encode(self, subjects: Sequence[Image.Image], prompts: Sequence[str],
             words: Sequence[str]) -> sampler.Conditions:
    """The sampler's conditions for B (subject, prompt, word) triples.

    Raises:
      ValueError: lists that do not pair up, a word not in its prompt.
    """
    b = pipeline_common.check_batch(subjects, prompts, words)
    text, uncond, word_weights = self.encode_prompts(prompts, words)
    return sampler.Conditions(text=text, uncond_text=uncond,
                              image=self.encode_subjects(subjects, b),
                              word_weights=word_weights)

  def initial_latents(self, seed: int, batch: int) -> jax.Array:
    """z_T ~ N(0, 1) at the latent size (DDIM's init_noise_sigma is 1)."""
    return pipeline_common.initial_latents(seed, batch, self.model.unet.in_channels,
                                           (self.latent_size, self.latent_size))

  def decode(self, latents: jax.Array) -> np.ndarray:
    """(B, C, h, w) latents -> (B, res, res, 3) uint8."""
    return np.asarray(self._decode(self.components.vae_params, latents))

  def __call__(self, subjects: Sequence[Image.Image], prompts: Sequence[str],
               words: Sequence[str], *, seed: int = 0, num_steps: Optional[int] = None,
               guidance_text: Optional[float] = None, guidance_image: Optional[float] = None,
               gamma_scope: Optional[float] = None, gamma_num: Optional[float] = None,
               settings: Optional[sampler.GuidanceSettings] = None,
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
      settings: all four (and the config's static settings) as GuidanceSettings
        already made, e.g. checked before the models were loaded; then the four
        arguments above must be None.
      return_masks: also return every step's scope and decoded x0 prediction.

    Returns:
      RealCustomOutput.

    Raises:
      ValueError: (before any tracing) for lists of different lengths, a word not in
        its prompt, a gamma outside [0, 1] or a bad step count.
    """
    settings = pipeline_common.given_settings(
        settings, lambda: self.settings(guidance_text, guidance_image, gamma_scope, gamma_num),
        guidance_text=guidance_text, guidance_image=guidance_image,
        gamma_scope=gamma_scope, gamma_num=gamma_num)
    schedule = self.schedule(num_steps)
    conditions = self.encode(subjects, prompts, words)
    b = conditions.text.shape[0]
    latents = self.initial_latents(seed, b) * schedule.init_noise_sigma
    logging.info('sampling %d image(s), %d DDIM steps', b, schedule.num_steps)
    out = sampler.sample(self.model, self.params, schedule, latents, conditions, settings,
                         return_trajectory=return_masks)
    jax.block_until_ready(out.latents)
    logging.info('decoding with the VAE')
    return pipeline_common.decoded_output(self.decode, out, return_masks)
