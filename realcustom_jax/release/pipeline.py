"""The authors' released RealCustom (SDXL) as a pipeline: what their inference scripts do.

  pipe = ReleasePipeline.from_pretrained(sdxl_dir, vision_dir, 'realcustom_highres.safetensors')
  out = pipe([subject], ['a dog wearing a spacesuit in space'], ['dog'], seed=0)

(`realcustom_jax.pipelines.load_pipeline` returns this class for a release config or
adapter.) One call follows `inference/inference_single_image.py` and
`inference/pipeline.py` of github.com/bytedance/RealCustom:

1. prompts and the negative prompt through SDXL's two CLIP text encoders
   (`sdxl_text`: penultimate layer without the final norm; unprojected pooled output),
   time ids (width, height, 0, 0, width, height) in the release's order;
2. the target word's tokens as the release finds them (`target_token_weights`);
3. the subject image to [0, 1], resized to the encoder's reference side (768 px:
   `torch.nn.functional.interpolate`, bilinear, align_corners False), encoded by
   SigLIP + DINOv2 (`release_encoder.SubjectEncoder`); the negative image is all zero;
4. the release's sampling in one jitted scan (`release.sampler.sample`: its guidance,
   mask strategy and reuse, and `schedules.release_schedule`: its single-step
   DPM-Solver++ on 'trailing' timesteps);
5. the last step's x0 prediction decoded by the VAE (latents / scaling factor).

The initial noise is JAX's (the release draws it with torch), so images match the
release's for the same latents, not for the same seed.
"""
import logging
import os
from typing import Optional, Sequence
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import model as model_lib
from realcustom_jax import pipeline_common
from realcustom_jax.release import convert as release
from realcustom_jax.release import defaults
from realcustom_jax.release import paths as release_paths
from realcustom_jax.release import encoder as release_encoder
from realcustom_jax import sampler
from realcustom_jax import schedules
from realcustom_jax.release import sampler as release_sampler
from realcustom_jax.release import sdxl_text
from realcustom_jax.release import sdxl_loading

RELEASE_NUM_STEPS = defaults.NUM_STEPS
RELEASE_GUIDANCE = defaults.GUIDANCE
RELEASE_MASK_SCOPE = defaults.MASK_SCOPE
RELEASE_MASK_STRATEGY = defaults.MASK_STRATEGY
RELEASE_MASK_REUSED_STEP = defaults.MASK_REUSED_STEP
RELEASE_HEIGHT, RELEASE_WIDTH = defaults.HEIGHT, defaults.WIDTH
RELEASE_NEGATIVE_PROMPT = defaults.NEGATIVE_PROMPT


def release_config() -> ml_collections.ConfigDict:
  """The release's settings (what configs/release.py holds), for weights given without
  a config."""
  return ml_collections.ConfigDict(dict(
      pipeline='release', pretrained='', vision_encoder='', adapter='', allow_pickle=False,
      height=RELEASE_HEIGHT, width=RELEASE_WIDTH, negative_prompt=RELEASE_NEGATIVE_PROMPT,
      vision=dict(image_size=release_encoder.RELEASE_IMAGE_SIZE,
                  siglip_layers=release_encoder.RELEASE_SIGLIP_LAYERS,
                  dino_layers=release_encoder.RELEASE_DINO_LAYERS,
                  patchify_scale=release_encoder.RELEASE_PATCHIFY_SCALE),
      model=dict(dtype='float32' if jax.default_backend() == 'cpu' else 'bfloat16',
                 attention_impl='auto', remat='none'),
      sampler=dict(num_steps=RELEASE_NUM_STEPS, solver=defaults.SOLVER,
                   guidance_image=RELEASE_GUIDANCE, gamma_scope=RELEASE_MASK_SCOPE,
                   mask_strategy=RELEASE_MASK_STRATEGY,
                   mask_reused_step=RELEASE_MASK_REUSED_STEP)))


# ---------------------------------------------------------------------------------
# The release's input preparation
# ---------------------------------------------------------------------------------


def target_token_weights(tokenizer, tokenizer_2, prompt: str, phrase: str) -> np.ndarray:
  """The release's target tokens (`_find_phrase_positions_in_text`) as (L,) weights.

  For every occurrence of `phrase` in `prompt` (`str.find`: case-sensitive, any
  substring), the tokens between the token counts of the text before it and the text
  through it are marked, each count being the mean over both tokenizers of the
  truncated prompt's tokens without start and end (`get_vaild_token_length`), offset 1
  for the start token.

  Raises:
    ValueError: the phrase does not occur, or only past the token limit.
  """
  if not isinstance(phrase, str) or not phrase.strip():
    raise ValueError(f'target word must be a non-empty string, got {phrase!r}')
  length = tokenizer.model_max_length

  def valid_tokens(text: str) -> int:
    counts = [min(len(t(text).input_ids), t.model_max_length) - 2 for t in (tokenizer, tokenizer_2)]
    return int(sum(counts) / len(counts))

  out = np.zeros(length, np.float32)
  position = prompt.find(phrase)
  if position < 0:
    raise ValueError(f'target word {phrase!r} does not occur in prompt {prompt!r}')
  while position >= 0:
    start = valid_tokens(prompt[:position]) + 1
    stop = valid_tokens(prompt[:position + len(phrase)]) + 1
    out[start:stop] = 1.0
    position = prompt.find(phrase, position + 1)
  if not out.any():
    raise ValueError(f'target word {phrase!r} occurs in prompt {prompt!r} only past the '
                     f'{length}-token limit')
  return out


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """torch's bilinear source taps (align_corners False): (i0, i1, weight of i1)."""
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def reference_pixels(image: Image.Image, size: int) -> np.ndarray:
  """The release's reference preparation: ToTensor, then bilinear to size x size.

  `torchvision.transforms.ToTensor()` (uint8 / 255) and `F.interpolate(size=(size,
  size), mode='bilinear', align_corners=False)` (no antialiasing), NHWC.

  Returns:
    float32 (size, size, 3) in [0, 1].
  """
  x = np.asarray(image.convert('RGB'), np.float32) / np.float32(255)
  r0, r1, rw = bilinear_taps(x.shape[0], size)
  x = x[r0] * (1 - rw)[:, None, None] + x[r1] * rw[:, None, None]
  c0, c1, cw = bilinear_taps(x.shape[1], size)
  x = x[:, c0] * (1 - cw)[None, :, None] + x[:, c1] * cw[None, :, None]
  return x.astype(np.float32)


# ---------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------


class ReleasePipeline:
  """SDXL + the release's subject encoder and adapter + the jitted release sampler.

  Attributes:
    config: the config (`release_config()`'s keys; configs/release.py).
    sdxl: the SDXL components.
    encoder: the loaded SubjectEncoder (SigLIP + DINOv2).
    model: the release model (`release.build_release_model`).
    params: its parameters (SDXL UNet + the converted adapter).
    height, width: output size in pixels.
  """

  def __init__(self, sdxl: sdxl_loading.SDXLComponents, encoder: release_encoder.LoadedEncoder,
               adapter_params, adapter_metadata, config=None):
    """Builds the pipeline.

    Args:
      sdxl: `sdxl_loading.load_sdxl(...)`.
      encoder: `release_encoder.load_subject_encoder(...)`.
      adapter_params, adapter_metadata: `release.load_release_adapter(path)`.
      config: see `release_config` (None: the release's settings).

    Raises:
      ValueError: an image size the UNet cannot take, or an adapter that does not fit
        the UNet or the encoder (one line).
    """
    self.config = config if config is not None else release_config()
    self.sdxl, self.encoder = sdxl, encoder
    self.height, self.width = int(self.config.height), int(self.config.width)
    factor = sdxl.vae_scale_factor
    model_config = dict(model_lib.DEFAULT_MODEL_CONFIG, **dict(self.config.get('model', {})))
    self.model = release.build_release_model(
        sdxl.unet_config, adapter_metadata, dtype=model_lib.DTYPES[model_config['dtype']],
        attention_impl=model_config['attention_impl'], remat=model_config['remat'],
        fused_word_maps=bool(model_config['fused_word_maps']))
    down = factor * 2 ** (len(self.model.unet.block_out_channels) - 1) * 2
    if self.height % down or self.width % down or self.height < down or self.width < down:
      raise ValueError(f'height {self.height} and width {self.width} must be positive '
                       f'multiples of {down} (VAE factor x UNet downsampling x the '
                       "release's half-latent mask)")
    self.latent_hw = (self.height // factor, self.width // factor)
    if encoder.feature_dim != self.model.release_vision_dim:
      raise ValueError(f'the adapter\'s projector takes {self.model.release_vision_dim}-wide '
                       f'features, the vision encoder gives {encoder.feature_dim}')
    params = adapter_params
    expected = model_lib.param_shapes(self.model, (4, 8, 8), 1, 1, 1)
    adapter_lib.check_tree_fits(params, adapter_lib.split_params(expected)[1], 'the adapter')
    self.params = adapter_lib.merge_params({'unet': sdxl.unet_params},
                                           jax.tree_util.tree_map(jnp.asarray, params))
    te1, te2 = sdxl.text_encoder, sdxl.text_encoder_2
    self._encode_text = jax.jit(lambda p, a, b: sdxl_text.encode(te1, te2, p, a, b))
    module = encoder.module
    self.reference_size = module.patchify_scale * module.image_size
    self._encode_image = jax.jit(lambda p, x: module.apply({'params': p}, x)[-2:])
    self._decode = pipeline_common.vae_decoder(sdxl.vae, sdxl.scaling_factor)
    self._negative_image = None
    self._negative_text = None

  # ---- Constructors ----

  @classmethod
  def from_pretrained(cls, sdxl_dir: str, vision_dir: str, adapter_path: str, config=None,
                      allow_pickle: bool = False) -> 'ReleasePipeline':
    """Loads a diffusers SDXL directory, the two timm ViTs and a converted adapter.

    Args:
      sdxl_dir: diffusers-format SDXL base 1.0 directory.
      vision_dir: directory holding the timm hub folders vit_so400m_patch14_siglip_384/
        and vit_large_patch14_reg4_dinov2.lvd142m/.
      adapter_path: `python -m sample.convert_release` output (.safetensors).
      config: see `release_config` (None: the release's settings).
      allow_pickle: accept torch `.bin` SDXL weights.

    Raises:
      ValueError: (one line) a missing directory or file, a paper adapter, weights that
        do not fit.
    """
    config = config if config is not None else release_config()
    if not adapter_path:
      raise ValueError('the release pipeline needs its converted adapter (--adapter): '
                       'python -m sample.convert_release --checkpoint=RealCustom_highres.pth '
                       '--out=realcustom_highres.safetensors --allow_pickle')
    if not os.path.isfile(adapter_path):
      raise ValueError(f'adapter file {adapter_path} does not exist')
    adapter_params, metadata = release.load_release_adapter(adapter_path)
    dtype = model_lib.DTYPES[dict(model_lib.DEFAULT_MODEL_CONFIG,
                                  **dict(config.get('model', {})))['dtype']]
    sdxl = sdxl_loading.load_sdxl(sdxl_dir, allow_pickle=allow_pickle, dtype=dtype)
    v = config.get('vision', {})
    encoder = release_encoder.load_subject_encoder(
        vision_dir, image_size=int(v.get('image_size', release_encoder.RELEASE_IMAGE_SIZE)),
        siglip_layers=tuple(v.get('siglip_layers', release_encoder.RELEASE_SIGLIP_LAYERS)),
        dino_layers=tuple(v.get('dino_layers', release_encoder.RELEASE_DINO_LAYERS)),
        patchify_scale=int(v.get('patchify_scale', release_encoder.RELEASE_PATCHIFY_SCALE)),
        dtype=dtype)
    return cls(sdxl, encoder, adapter_params, metadata, config)

  @classmethod
  def from_config(cls, config) -> 'ReleasePipeline':
    """The files `config` names; the tiny random release (written once to
    `config.tiny_release.dir`, default a cache directory) when `pretrained` is empty
    and the config has a `tiny_release` section."""
    paths = resolve_paths(config)
    return cls.from_pretrained(paths['sdxl'], paths['vision'], paths['adapter'], config,
                               bool(config.get('allow_pickle', False)))

  # ---- Encoding ----

  def encode_prompts(self, prompts: Sequence[str], words: Sequence[str]) -> sampler.Conditions:
    """The text half of the conditions: prompt and negative-prompt features, pooled
    embeddings, time ids, word weights (no image fields)."""
    tok, tok2 = self.sdxl.tokenizer, self.sdxl.tokenizer_2
    weights_ = np.stack([target_token_weights(tok, tok2, p, w) for p, w in zip(prompts, words)])
    b = len(prompts)
    encode = lambda ids: self._encode_text(self.sdxl.text_params, *map(jnp.asarray, ids))
    context, pooled = encode(sdxl_text.tokenize(tok, tok2, list(prompts)))
    if self._negative_text is None:
      with warnings.catch_warnings():  # the release's tokenizers truncate it silently
        warnings.simplefilter('ignore')
        ids = sdxl_text.tokenize(tok, tok2, [str(self.config.get('negative_prompt', ''))])
      self._negative_text = encode(ids)
    neg_context, neg_pooled = self._negative_text
    time_ids = jnp.broadcast_to(jnp.asarray(sdxl_text.release_time_ids(self.height,
                                                                        self.width)), (b, 6))
    rows = lambda x: jnp.broadcast_to(x, (b,) + x.shape[1:])
    return sampler.Conditions(
        text=context, uncond_text=rows(neg_context), word_weights=jnp.asarray(weights_),
        added={'text_embeds': pooled, 'time_ids': time_ids},
        uncond_added={'text_embeds': rows(neg_pooled), 'time_ids': time_ids})

  def encode_subjects(self, subjects: Sequence[Image.Image], batch: int):
    """((global, local) of the subjects, (global, local) of the all-zero image)."""
    pixels = np.stack([reference_pixels(s, self.reference_size) for s in subjects])
    feats = self._encode_image(self.encoder.params, jnp.asarray(pixels))
    if self._negative_image is None:
      zero = jnp.zeros((1, self.reference_size, self.reference_size, 3), jnp.float32)
      self._negative_image = self._encode_image(self.encoder.params, zero)
    rows = lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:])
    return (tuple(rows(x) for x in feats), tuple(rows(x) for x in self._negative_image))

  def encode(self, subjects: Sequence[Image.Image], prompts: Sequence[str],
             words: Sequence[str]) -> sampler.Conditions:
    """The sampler's conditions for B (subject, prompt, word) triples, the all-zero
    negative image included.

    Raises:
      ValueError: lists that do not pair up, a word not in its prompt.
    """
    b = pipeline_common.check_batch(subjects, prompts, words)
    feats, negative = self.encode_subjects(subjects, b)
    return self.encode_prompts(prompts, words).replace(image=feats, uncond_image=negative)

  def initial_latents(self, seed: int, batch: int) -> jax.Array:
    return pipeline_common.initial_latents(seed, batch, self.model.unet.in_channels,
                                           self.latent_hw)

  def decode(self, latents: jax.Array) -> np.ndarray:
    """(B, C, h, w) latents -> (B, height, width, 3) uint8."""
    return np.asarray(self._decode(self.sdxl.vae_params, latents))

  def settings(self, guidance_scale=None, mask_scope=None,
               mask_reused_step=None) -> sampler.GuidanceSettings:
    """Checked GuidanceSettings: the values given, else `config.sampler`'s."""
    return sampler.GuidanceSettings.from_config(
        self.config.sampler, guidance_image=guidance_scale, gamma_scope=mask_scope,
        mask_reused_step=mask_reused_step)

  def check_word(self, prompt: str, word: str) -> None:
    """ValueError (one line) unless the release finds `word` in `prompt` (`str.find`)."""
    target_token_weights(self.sdxl.tokenizer, self.sdxl.tokenizer_2, prompt, word)

  def schedule(self, num_steps: Optional[int] = None) -> schedules.Schedule:
    """The release's schedule of `num_steps` steps (default `config.sampler.num_steps`)."""
    num_steps = self.config.sampler.num_steps if num_steps is None else num_steps
    return schedules.release_schedule(num_steps, self.config.sampler.get('solver',
                                                                       'dpm_solver_2s'))

  # ---- Generation ----

  def __call__(self, subjects: Sequence[Image.Image], prompts: Sequence[str],
               words: Sequence[str], *, seed: int = 0, num_steps: Optional[int] = None,
               guidance_scale: Optional[float] = None, mask_scope: Optional[float] = None,
               mask_reused_step: Optional[int] = None,
               settings: Optional[sampler.GuidanceSettings] = None,
               return_masks: bool = False):
    """Generates one image per (subject, prompt, word) triple, as the release does.

    Args:
      subjects: B subject images, or one shared by every prompt.
      prompts: B prompts.
      words: B target words (the release's target phrase), each in its prompt.
      seed: PRNG seed of z_T.
      num_steps: sampling steps (default config.sampler.num_steps, the release's 25).
      guidance_scale: the release's guidance weight (default config, 3.5).
      mask_scope: the release's mask_scope (default config, 0.25).
      mask_reused_step: steps from this one on reuse the previous mask (default 12).
      settings: the three as GuidanceSettings already made (with the config's static
        settings); then the three arguments above must be None.
      return_masks: also return every step's mask and decoded x0 prediction.

    Returns:
      pipeline_common.RealCustomOutput.

    Raises:
      ValueError: (before any tracing) lists of different lengths, a word not in its
        prompt, bad settings.
    """
    settings = pipeline_common.given_settings(
        settings, lambda: self.settings(guidance_scale, mask_scope, mask_reused_step),
        guidance_scale=guidance_scale, mask_scope=mask_scope,
        mask_reused_step=mask_reused_step)
    schedule = self.schedule(num_steps)
    conditions = self.encode(subjects, prompts, words)
    b = conditions.text.shape[0]
    latents = self.initial_latents(seed, b) * schedule.init_noise_sigma
    logging.info('sampling %d image(s), %d release steps (%s)', b, schedule.num_steps,
                 schedule.solver)
    out = release_sampler.sample(self.model, self.params, schedule, latents, conditions,
                                 settings, return_trajectory=return_masks)
    return pipeline_common.decoded_output(self.decode, out, return_masks)


def resolve_paths(config) -> dict[str, str]:
  """{'sdxl', 'vision', 'adapter'} from the config, the tiny release written if asked.

  Raises:
    ValueError: (one line) a path missing from a config for real weights.
  """
  folder = release_paths.tiny_release_dir(config)
  if folder:
    from realcustom_jax.release import tiny as tiny_release  # pylint: disable=g-import-not-at-top
    sizes = {k: v for k, v in dict(config.tiny_release).items() if k != 'dir'}
    where = tiny_release.write_tiny_release(folder, sizes)
    return dict(sdxl=where['sdxl'], vision=config.get('vision_encoder', '') or where['vision'],
                adapter=config.get('adapter', '') or where['adapter'])
  message = release_paths.release_paths_message(config)
  if message:
    raise ValueError(message)
  return dict(sdxl=config.pretrained, vision=config.vision_encoder, adapter=config.adapter)
