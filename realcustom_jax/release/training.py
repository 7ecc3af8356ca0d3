"""Training the authors' released architecture (SDXL + SigLIP / DINOv2 + projector).

The release (github.com/bytedance/RealCustom) publishes inference code and one set of
weights, no training code and no recipe. What trains here is our reading of its code:
exactly the parameters its `RealCustom_highres.pth` holds (`convert.py`): the
`ProjectorHighResMinAttn` projector and every attn2's `to_k_vision` / `to_v_vision`.
Frozen: the SDXL UNet, the VAE, both text encoders and both ViT towers; they are
passed to the step apart from the train state, so neither gradient nor optimizer state
exists for them. One step (one `jax.jit`, encoders included):

  z_0 = scaling_factor * VAE(x)
  (c, pooled) = SDXL text encoders (caption)           (penultimate, no final norm)
  (g, l) = SubjectEncoder(reference(x))                (the release's 768 px views)
  time_ids = (original h, w, crop top, left, target h, w) per sample (SDXL's order)
  condition dropout per row: caption -> '' (its c and pooled), subject -> the all-zero
    reference (the release's negative image), or both: the two guidance branches
  t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
  loss = || eps - eps_theta(z_t, t, c, (g, l), pooled, time_ids) ||^2

The update itself is the paper trainer's `adapter_training.adapter_step`; the loop is
`train/train.py`, which reaches these functions through the release family
(`release/family.py`) for a release config (`configs/release_train.py`,
`configs/release_train_tiny.py`). No mask gates the visual attention
in training (the release's mask is an inference-time guidance device).

`export` writes a trained adapter as our file and back under the release's state-dict
names (`convert.export_release_state`), so the authors' torch code loads it (`unet.load_state_dict(..., strict=False)`).
"""
from collections.abc import Callable
import dataclasses
import os
from typing import Any, Mapping, Optional

import chex
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import adapter_training
from realcustom_jax import model as model_lib
from realcustom_jax.release import model as release_model
from realcustom_jax import unet as unet_lib
from realcustom_jax.release import sdxl_loading
from realcustom_jax.release import convert
from realcustom_jax.release import encoder as release_encoder
from realcustom_jax.release import paths as release_paths
from realcustom_jax.release import pipeline as release_pipeline
from realcustom_jax.release import sdxl_text
from realcustom_jax.release import tiny_sdxl

Array = jax.Array
State = adapter_training.State
ConfigError = adapter_training.ConfigError

# The batch the step takes (besides 'image', (B, H, W, 3) in [-1, 1]).
TEXT_IDS = ('input_ids', 'input_ids_2')
TIME_IDS = 'time_ids'
# What the frozen encoders give per sample (`encode_features`), in this order.
FEATURES = ('latent_mean', 'latent_std', 'text', 'pooled', 'image_global', 'image_local',
            TIME_IDS)


@dataclasses.dataclass
class ReleaseComponents:
  """The frozen parts: SDXL and the subject encoder, loaded."""
  sdxl: sdxl_loading.SDXLComponents
  encoder: release_encoder.LoadedEncoder


@dataclasses.dataclass(frozen=True)
class ReleaseModels:
  """The modules (no parameters) the step closes over."""
  model: release_model.ReleaseRealCustom
  vae: Any  # diffusers FlaxAutoencoderKL
  text_encoder: Any  # clip.CLIPTextModel of text_encoder/
  text_encoder_2: Any  # clip.CLIPTextModel of text_encoder_2/
  subject_encoder: release_encoder.SubjectEncoder
  scaling_factor: float

  @property
  def reference_size(self) -> int:
    """The side of the reference image the encoder takes (the release: 768 px)."""
    return self.subject_encoder.patchify_scale * self.subject_encoder.image_size


@dataclasses.dataclass(frozen=True)
class ReleaseStepConfig:
  """The step's hyper-parameters (static under jit).

  Attributes:
    base: the noise schedule and prediction type (`adapter_training.StepConfig`; its
      image dropout is 0: the release's subject dropout is the zero reference below).
    caption_dropout: rows whose caption alone is replaced by ''.
    subject_dropout: rows whose subject alone is replaced by the all-zero reference.
    both_dropout: rows with both replaced (the negative branch's conditions).
  """
  base: adapter_training.StepConfig
  caption_dropout: float = 0.05
  subject_dropout: float = 0.05
  both_dropout: float = 0.05


# ---------------------------------------------------------------------------------
# Config and frozen components
# ---------------------------------------------------------------------------------


def check_config(config) -> None:
  """ValueError (one line) for a release training config's own keys, before any model.

  Reads `config.model` (projector 'release_highres', scoring 'none'),
  `config.train.{caption,subject,both}_dropout`, `config.resolution`,
  `config.init_adapter` and the weights keys.
  """
  release_model.check_release_model_config(config.model)
  t = config.train
  rates = {k: float(t.get(k, 0.0)) for k in ('caption_dropout', 'subject_dropout',
                                              'both_dropout')}
  for key, value in rates.items():
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'config.train.{key} must lie in [0, 1], got {value}')
  if sum(rates.values()) > 1.0:
    raise ValueError('config.train.caption_dropout + subject_dropout + both_dropout must '
                     f'be at most 1, got {sum(rates.values()):g}')
  if int(config.resolution) <= 0:
    raise ValueError(f'config.resolution must be positive, got {config.resolution}')
  init = config.get('init_adapter', '')
  if init:
    if not os.path.isfile(init):
      raise ValueError(f'config.init_adapter={init}: no such file')
    adapter_lib.check_adapter_metadata(adapter_lib.load_adapter_metadata(init),
                                       f'config.init_adapter={init}', adapter_lib.RELEASE_KIND)
  if release_paths.tiny_release_dir(config) is None:
    keys = (('pretrained', 'the SDXL base diffusers directory'),
            ('vision_encoder', 'the directory holding the two timm ViT folders'))
    missing = [f'--config.{k}=DIR ({what})' for k, what in keys if not config.get(k, '')]
    if missing:
      raise ValueError(f'release training needs {" and ".join(missing)}')
    for key, _ in keys:
      if not os.path.isdir(config[key]):
        raise ValueError(f'--config.{key}={config[key]}: no such directory')


def weights_paths(config) -> dict[str, str]:
  """{'sdxl', 'vision'} directories; the tiny release written first when asked
  (`config.tiny_release`, no `pretrained`), with its converted adapter ('adapter')."""
  folder = release_paths.tiny_release_dir(config)
  if folder:
    from realcustom_jax.release import tiny as tiny_release  # pylint: disable=g-import-not-at-top
    sizes = {k: v for k, v in dict(config.tiny_release).items() if k != 'dir'}
    where = tiny_release.write_tiny_release(folder, sizes)
    return dict(sdxl=where['sdxl'], vision=config.get('vision_encoder', '') or where['vision'],
                adapter=where['adapter'])
  return dict(sdxl=config.pretrained, vision=config.vision_encoder)


def load_components(config) -> ReleaseComponents:
  """SDXL and the subject encoder that `config` names, in float32 (the trainer casts
  the frozen trees to `config.train.frozen_dtype` when it places them).

  Raises:
    ValueError: (one line) a missing or unreadable directory.
  """
  where = weights_paths(config)
  sdxl = sdxl_loading.load_sdxl(where['sdxl'], allow_pickle=bool(config.get('allow_pickle', False)),
                           dtype=jnp.float32)
  v = config.vision
  encoder = release_encoder.load_subject_encoder(
      where['vision'], image_size=int(v.image_size), siglip_layers=tuple(v.siglip_layers),
      dino_layers=tuple(v.dino_layers), patchify_scale=int(v.patchify_scale),
      dtype=jnp.float32)
  return ReleaseComponents(sdxl, encoder)


def build_models(config, components: ReleaseComponents) -> tuple[ReleaseModels,
                                                                 ReleaseStepConfig]:
  """The step's modules and hyper-parameters.

  Raises:
    ConfigError: a projector width that differs from the encoder's features, a schedule
      that cannot be built, a resolution the UNet does not take.
  """
  sdxl, encoder = components.sdxl, components.encoder
  model = release_model.build_model(config, sdxl.unet_config)
  if model.release_vision_dim != encoder.feature_dim:
    raise ConfigError(f'config.model.release_vision_dim={model.release_vision_dim}, the '
                      f'subject encoder gives {encoder.feature_dim}-wide features')
  # The UNet halves the latents once per down block but the last.
  factor = sdxl.vae_scale_factor * 2 ** (len(model.unet.block_out_channels) - 1)
  if int(config.resolution) % factor:
    raise ConfigError(f'config.resolution={config.resolution} is not a multiple of {factor} '
                      '(VAE factor x UNet downsampling)')
  # The release samples with squared-linear betas over 1000 steps: SDXL's own training
  # schedule, which its scheduler/ says (absent: the same by SDXL's defaults).
  scheduler_config = sdxl.scheduler_config or tiny_sdxl.SDXL_SCHEDULER_CONFIG
  base_config = config.copy_and_resolve_references()
  with base_config.unlocked():
    base_config.train.gamma_num_range = (1.0, 1.0)  # no top-k: no scoring
    base_config.train.image_dropout = 0.0  # subject dropout is the zero reference
  t = config.train
  step_config = ReleaseStepConfig(
      base=adapter_training.build_step_config(base_config, scheduler_config),
      caption_dropout=float(t.caption_dropout), subject_dropout=float(t.subject_dropout),
      both_dropout=float(t.both_dropout))
  models = ReleaseModels(model=model, vae=sdxl.vae, text_encoder=sdxl.text_encoder,
                         text_encoder_2=sdxl.text_encoder_2,
                         subject_encoder=encoder.module,
                         scaling_factor=float(sdxl.scaling_factor))
  return models, step_config


def feature_shapes(config, components: ReleaseComponents) -> dict[str, tuple[int, ...]]:
  """Per-sample shapes of the step's inputs and of what the encoders give."""
  sdxl, module = components.sdxl, components.encoder.module
  side = int(config.resolution) // sdxl.vae_scale_factor
  r = module.patchify_scale * module.image_size
  feats = jax.eval_shape(lambda x: module.apply({'params': components.encoder.params}, x)[-2:],
                         jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32))
  length = sdxl.tokenizer.model_max_length
  res = int(config.resolution)
  return dict(image=(res, res, 3), input_ids=(length,), input_ids_2=(length,),
              time_ids=(6,), latents=(sdxl.unet_config.get('in_channels', 4), side, side),
              text=(length, sdxl.unet_config['cross_attention_dim']),
              pooled=(sdxl.text_encoder_2.config.hidden_size,),
              image_global=tuple(feats[0].shape[1:]), image_local=tuple(feats[1].shape[1:]))


def abstract_batch(config, components: ReleaseComponents, batch_size: int) -> dict:
  """The loader's batch as ShapeDtypeStructs (what the step is compiled for)."""
  shapes = feature_shapes(config, components)
  dtypes = dict(image=np.float32, input_ids=np.int32, input_ids_2=np.int32,
                time_ids=np.float32)
  return {k: jax.ShapeDtypeStruct((batch_size,) + shapes[k], d) for k, d in dtypes.items()}


# ---------------------------------------------------------------------------------
# The adapter: from scratch, or a converted release file
# ---------------------------------------------------------------------------------


def init_adapter(config, models: ReleaseModels, components: ReleaseComponents,
                 rng: Array) -> dict:
  """The initial adapter, float32: `config.init_adapter`'s exact values (fine-tuning a
  converted release adapter or a previous export), else from scratch (every visual K/V
  a copy of its layer's text K/V, or with `config.train.visual_kv_init='zero_v'` a zero
  to_v_vision; the projector at its flax init).

  Raises:
    ConfigError: a file whose tree or widths do not fit the model.
  """
  path = config.get('init_adapter', '')
  model = models.model
  if not path:
    shapes = feature_shapes(config, components)
    return adapter_training.init_adapter(
        model, components.sdxl.unet_params, rng,
        dict(latents=shapes['latents'], text=shapes['text'], image=shapes['image_global']),
        config.train.get('visual_kv_init', 'copy_text'))
  try:
    params, metadata = convert.load_release_adapter(path, model)
  except ValueError as e:
    raise ConfigError(f'config.init_adapter: {e}') from None
  m = convert.model_config_of(metadata)
  if int(m['release_dim_head']) != model.release_dim_head:
    raise ConfigError(f'config.init_adapter={path} has projector heads of '
                      f'{m["release_dim_head"]}, config.model.release_dim_head is '
                      f'{model.release_dim_head}')
  # float16 / bfloat16 -> float32 is exact: training starts from the file's values.
  return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float32)), params)


# ---------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------


def reference_pixels(images: Array, size: int) -> Array:
  """The release's reference preparation of training images, in jax.

  The release gives its encoder ToTensor(image) (uint8 / 255) resized to size x size
  with `F.interpolate(mode='bilinear', align_corners=False)`
  (`release.pipeline.reference_pixels`, for PIL images); here the loader's [-1, 1]
  images (uint8 / 127.5 - 1) are mapped back to their uint8 levels first, so the
  values are ToTensor's.

  Args:
    images: (B, H, W, 3) in [-1, 1].
    size: the reference side (`ReleaseModels.reference_size`).

  Returns:
    (B, size, size, 3) float32 in [0, 1].
  """
  x = jnp.round((images.astype(jnp.float32) + 1.0) * 127.5) / jnp.float32(255)
  r0, r1, rw = release_pipeline.bilinear_taps(x.shape[1], size)
  x = x[:, r0] * (1 - rw)[None, :, None, None] + x[:, r1] * rw[None, :, None, None]
  c0, c1, cw = release_pipeline.bilinear_taps(x.shape[2], size)
  return x[:, :, c0] * (1 - cw)[None, None, :, None] + x[:, :, c1] * cw[None, None, :, None]


def subject_features(models: ReleaseModels, params: Mapping, reference: Array
                     ) -> tuple[Array, Array]:
  """(global (B, n, c), local (B, 4n, c)) of (B, R, R, 3) references in [0, 1]."""
  return tuple(models.subject_encoder.apply({'params': params}, reference)[-2:])


def null_conditions(models: ReleaseModels, frozen: Mapping, tokenizer, tokenizer_2
                    ) -> dict[str, Array]:
  """What dropped conditions become, one row each: the empty caption's features and
  pooled embedding, and the all-zero reference's features (the release's negative
  image, `ReleasePipeline.encode_subjects`)."""
  ids = sdxl_text.tokenize(tokenizer, tokenizer_2, [''])
  text, pooled = sdxl_text.encode(models.text_encoder, models.text_encoder_2, frozen['text'],
                                  *map(jnp.asarray, ids))
  r = models.reference_size
  g, l = subject_features(models, frozen['vision'], jnp.zeros((1, r, r, 3), jnp.float32))
  return {'text': text, 'pooled': pooled, 'image_global': g, 'image_local': l}


def encode_features(frozen: Mapping, batch: Mapping[str, Array],
                    models: ReleaseModels) -> dict[str, Array]:
  """The frozen encoders' deterministic outputs for a batch (see FEATURES): the VAE
  posterior's moments (NHWC, unscaled), the SDXL text features and pooled embedding,
  the subject features of the release's reference views of the same image; the
  time ids pass through."""
  images = batch['image'].astype(jnp.float32)
  posterior = models.vae.apply({'params': frozen['vae']}, jnp.transpose(images, (0, 3, 1, 2)),
                               method=models.vae.encode).latent_dist
  text, pooled = sdxl_text.encode(models.text_encoder, models.text_encoder_2, frozen['text'],
                                  batch['input_ids'], batch['input_ids_2'])
  g, l = subject_features(models, frozen['vision'],
                          reference_pixels(images, models.reference_size))
  return {'latent_mean': posterior.mean, 'latent_std': posterior.std, 'text': text,
          'pooled': pooled, 'image_global': g, 'image_local': l,
          TIME_IDS: batch[TIME_IDS]}


def condition_dropout(rng: Array, batch: int, step_config: ReleaseStepConfig
                      ) -> tuple[Array, Array]:
  """(drop caption, drop subject), (B,) bools: one uniform draw per row falls into the
  caption-only, subject-only or both interval (IP-Adapter's scheme), else keeps both."""
  u = jax.random.uniform(rng, (batch,))
  c, s, both = step_config.caption_dropout, step_config.subject_dropout, step_config.both_dropout
  drop_caption = (u < c) | ((u >= c + s) & (u < c + s + both))
  drop_subject = (u >= c) & (u < c + s + both)
  return drop_caption, drop_subject


def _where_rows(drop: Array, null: Array, x: Array) -> Array:
  return jnp.where(drop.reshape((-1,) + (1,) * (x.ndim - 1)), null.astype(x.dtype), x)


def precomputed_train_step(state: State, frozen: Mapping, batch: Mapping[str, Array], *,
                           models: ReleaseModels, step_config: ReleaseStepConfig,
                           optimizer: optax.GradientTransformation) -> tuple[State, dict]:
  """The release step on the encoders' outputs (`encode_features`): `frozen` needs
  'unet' and 'null' (`null_conditions`). The randomness of step s is fold_in(rng, s),
  split into z_0's draw, the condition dropout and `adapter_step`'s t, eps."""
  chex.assert_rank([batch['text'], batch['pooled'], batch[TIME_IDS]], [3, 2, 2])
  rng = jax.random.fold_in(state['rng'], state['step'])
  enc_rng, drop_rng, step_rng = jax.random.split(rng, 3)
  latents = adapter_training.sample_latents(batch['latent_mean'], batch['latent_std'],
                                            enc_rng, models.scaling_factor)
  drop_caption, drop_subject = condition_dropout(drop_rng, latents.shape[0], step_config)
  null = frozen['null']
  f32 = lambda k: batch[k].astype(jnp.float32)
  text = _where_rows(drop_caption, null['text'], f32('text'))
  pooled = _where_rows(drop_caption, null['pooled'], f32('pooled'))
  image = tuple(_where_rows(drop_subject, null[k], f32(k))
                for k in ('image_global', 'image_local'))
  added = {'text_embeds': pooled, 'time_ids': f32(TIME_IDS)}
  return adapter_training.adapter_step(
      state, frozen['unet'], latents, text, image, step_rng, models=models,
      step_config=step_config.base, optimizer=optimizer, added_cond=added)


def train_step(state: State, frozen: Mapping, batch: Mapping[str, Array], *,
               models: ReleaseModels, step_config: ReleaseStepConfig,
               optimizer: optax.GradientTransformation) -> tuple[State, dict]:
  """Encode with the frozen models, then update the adapter; one jit around both."""
  features = jax.lax.stop_gradient(encode_features(frozen, batch, models))
  return precomputed_train_step(state, frozen, features, models=models,
                                step_config=step_config, optimizer=optimizer)


def setup_training(config, mesh, components: ReleaseComponents, *,
                   with_encoders: bool = True
                   ) -> tuple[adapter_training.TrainSetup, dict[str, tuple[int, ...]]]:
  """Everything the release step needs, placed on `mesh` (the paper trainer's
  `adapter_training.setup_training`, for the release).

  Args:
    config: the release training config.
    mesh: the device mesh.
    components: the frozen SDXL and subject encoder.
    with_encoders: False places only the UNet and the null conditions (precomputed
      features).

  Returns:
    (TrainSetup, `feature_shapes`).

  Raises:
    ConfigError: see `build_models` and `init_adapter`.
  """
  models, step_config = build_models(config, components)
  sdxl, encoder = components.sdxl, components.encoder
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  adapter = init_adapter(config, models, components, init_rng)
  encoders = {'vae': sdxl.vae_params, 'text': sdxl.text_params, 'vision': encoder.params}
  null = jax.jit(lambda f: null_conditions(models, f, sdxl.tokenizer, sdxl.tokenizer_2))(
      encoders)
  frozen = {'unet': sdxl.unet_params, 'null': null}
  if with_encoders:
    frozen.update(encoders)
  setup = adapter_training.place_train_setup(
      config, mesh, models, step_config, adapter, frozen, step_fn=train_step,
      precomputed_step_fn=precomputed_train_step, precomputed_frozen=('unet', 'null'))
  return setup, feature_shapes(config, components)


# ---------------------------------------------------------------------------------
# Export: our file and the release's own layout
# ---------------------------------------------------------------------------------


def export_metadata(model_config: Mapping[str, Any], unet_config: Mapping[str, Any],
                    source: str) -> dict[str, str]:
  """The release-kind metadata of an adapter trained here (what the converter writes
  for the release's own file), so `load_pipeline` and `sample.main` take it."""
  unet = unet_lib.RealCustomUNet.from_config(dict(unet_config))
  m = release_model.release_model_settings(model_config)
  info = dict(vision_dim=int(m['release_vision_dim']), out_dim=unet.cross_attention_dim,
              dim_head=int(m['release_dim_head']),
              cross_attention_layers=len(convert.attn2_layers(unet)))
  return convert.release_metadata(info, unet_config, source, 'float32')


def unet_config_for_export(unet_config: Mapping[str, Any]) -> dict[str, Any]:
  """The UNet config as the checkpoint's JSON keeps it (what export rebuilds from)."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()}


def export(params: Mapping, model_config: Mapping[str, Any], unet_config: Mapping[str, Any],
           out: str, step: int, release_out: Optional[str] = None) -> None:
  """Writes a trained release adapter: `out` (ours, release kind: `sample.main
  --config=configs/release*.py --adapter=out` samples with it) and, when given,
  `release_out` (the release's key layout, float32, for its torch code)."""
  unet_config = {k: convert._tuples(v) for k, v in unet_config.items()}  # pylint: disable=protected-access
  metadata = dict(export_metadata(model_config, unet_config, f'train.export step {step}'),
                  step=str(step))
  adapter_lib.save_adapter(out, params, metadata)
  if release_out:
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    if not os.fspath(release_out).endswith('.safetensors'):
      raise ValueError(f'release-layout output {release_out} must end in .safetensors')
    unet = unet_lib.RealCustomUNet.from_config(unet_config)
    os.makedirs(os.path.dirname(os.path.abspath(release_out)), exist_ok=True)
    # 'format': 'pt' is what safetensors.torch writes; torch readers expect it.
    safetensors.numpy.save_file(convert.export_release_state(params, unet), release_out,
                                metadata={'format': 'pt', 'step': str(step),
                                          'release_code': convert.RELEASE_CODE})


# ---------------------------------------------------------------------------------
# Input: what the loader gives the step
# ---------------------------------------------------------------------------------


class SDXLTrainPreprocess(grain.transforms.Map):
  """SDXL's training inputs: the image in [-1, 1], the caption through both
  tokenizers, and the per-sample micro-conditions as SDXL trains on them.

  `time_ids` = (original height, width, crop top, left, target height, width): the
  source's size before any resize and the crop actually taken
  (`laion_builder.center_crop_top_left`), both stored when the set was prepared, and
  the training size. SDXL's (diffusers') order; the release's inference scripts pass
  width and height the other way round (`sdxl_text.release_time_ids`), the same for
  square images.
  """

  def __init__(self, tokenize_fn: Callable[[str], np.ndarray],
               tokenize_fn_2: Callable[[str], np.ndarray], resolution: int):
    self._tokenize = (tokenize_fn, tokenize_fn_2)
    self._resolution = int(resolution)

  def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
    caption = element['caption']
    if isinstance(caption, bytes):
      caption = caption.decode('utf-8')
    ids, ids_2 = (np.asarray(fn(caption), dtype=np.int32) for fn in self._tokenize)
    image = np.asarray(element['image'], dtype=np.float32) / 127.5 - 1.0
    res = self._resolution
    time_ids = np.concatenate([np.asarray(element['original_size'], np.float32),
                               np.asarray(element['crop_top_left'], np.float32),
                               np.array([res, res], np.float32)])
    return {'image': image, 'input_ids': ids, 'input_ids_2': ids_2, 'time_ids': time_ids}
