"""The authors' released model as a family (`family.Family`): SDXL + SigLIP / DINOv2, the
`ProjectorHighResMinAttn` projector, no scoring module, the release's guidance and masks.

Assembled from `release.paths`, `release.pipeline` and `release.training`;
`pipelines.family_for` hands it out for a config with `pipeline = 'release'`.
"""
from typing import Optional

from realcustom_jax import family as family_lib
from realcustom_jax.release import paths


def check_word(config, prompt: str, word: str) -> None:
  """The release finds its target phrase with `str.find` (case-sensitive)."""
  del config
  if not word.strip() or word not in prompt:
    raise ValueError(f'target word {word!r} does not occur in prompt {prompt!r}')


def check_training_config(config) -> None:
  from realcustom_jax.release import training  # pylint: disable=g-import-not-at-top
  training.check_config(config)


# ---- Sampling ----


def pipeline_from_config(config):
  from realcustom_jax.release import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.ReleasePipeline.from_config(config)


def pipeline_from_pretrained(pretrained: str, vision_encoder: str, adapter: Optional[str],
                             allow_pickle: bool = False):
  from realcustom_jax.release import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.ReleasePipeline.from_pretrained(pretrained, vision_encoder, adapter, None,
                                                  allow_pickle)


def _defaults(s) -> dict:
  strategy = s.get('mask_strategy', 'paper')
  return dict(guidance_scale=float(s.get('guidance_image', 3.5)),
              mask_scope=float(s.get('gamma_scope', 0.25)),
              mask_strategy=[strategy] if isinstance(strategy, str) else list(strategy),
              mask_reused_step=int(s.get('mask_reused_step', None) or 0))


def _settings(sampler_config, values: dict):
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  modes = values['mask_strategy']
  modes = [modes] if isinstance(modes, str) else list(modes or [])
  if not modes:
    raise ValueError('pick at least one mask strategy mode (the release: max_norm)')
  reuse = int(values['mask_reused_step'])
  if reuse < 0:
    raise ValueError(f'mask_reused_step must be 0 (off) or a step >= 1, got {reuse}')
  settings = sampler.GuidanceSettings.from_config(
      sampler_config, guidance_image=values['guidance_scale'],
      gamma_scope=values['mask_scope'], mask_strategy=tuple(modes),
      mask_reused_step=reuse or None)
  return settings if reuse else settings.replace(mask_reused_step=None)


def _describe(settings) -> str:
  modes = settings.mask_strategy
  modes = modes if isinstance(modes, str) else '+'.join(modes)
  return f', mask {modes}, reuse {"off" if settings.mask_reused_step is None else "on"}'


def _mask_modes() -> tuple[str, ...]:
  from realcustom_jax import mask_strategies  # pylint: disable=g-import-not-at-top
  return tuple(m for m in mask_strategies.RELEASE_MASK_MODES
               if m not in mask_strategies.INERT_MODES)


def controls() -> family_lib.GuidanceControls:
  """The release's guidance controls (its mask modes read from `mask_strategies`)."""
  return family_lib.GuidanceControls(
      controls=(
          family_lib.Control('guidance_scale', 'Guidance scale', maximum=15, step=0.1),
          family_lib.Control('mask_scope', 'mask_scope (share of the image the subject '
                             'may influence)'),
          family_lib.Control('mask_strategy', 'Mask strategy', kind='choices',
                             choices=_mask_modes(), static=True),
          family_lib.Control('mask_reused_step', 'mask_reused_step (steps from it on reuse '
                             'the mask before it; 0: off)', maximum=None, step=1,
                             integer=True, static=True)),
      defaults=_defaults,
      settings=_settings,
      plain_scale=lambda settings: settings.guidance_image,
      describe=_describe,
      static_words='mask strategy and reuse on/off')


# ---- Training ----


def load_training_components(config):
  from realcustom_jax.release import training  # pylint: disable=g-import-not-at-top
  return training.load_components(config)


def train_preprocess(config, loaded):
  import functools  # pylint: disable=g-import-not-at-top
  from realcustom_jax import training_inputs  # pylint: disable=g-import-not-at-top
  from realcustom_jax.release import training  # pylint: disable=g-import-not-at-top
  sdxl = loaded.sdxl
  return training.SDXLTrainPreprocess(
      functools.partial(training_inputs.tokenize_caption, sdxl.tokenizer),
      functools.partial(training_inputs.tokenize_caption, sdxl.tokenizer_2),
      config.resolution)


def setup_training(config, mesh, loaded, with_encoders: bool = True):
  from realcustom_jax.release import training  # pylint: disable=g-import-not-at-top
  return training.setup_training(config, mesh, loaded, with_encoders=with_encoders)


def abstract_batch(config, loaded, shapes: dict, batch_size: int) -> dict:
  from realcustom_jax.release import training  # pylint: disable=g-import-not-at-top
  del shapes
  return training.abstract_batch(config, loaded, batch_size)


def checkpoint_extras(loaded) -> dict:
  """The UNet config: what export rebuilds the release's key layout from."""
  from realcustom_jax.release import training  # pylint: disable=g-import-not-at-top
  return {'release_unet_config': training.unet_config_for_export(loaded.sdxl.unet_config)}


def export(params, checkpoint_config: dict, out: str, step: int,
           release_out: Optional[str] = None) -> list[str]:
  """A release-kind adapter, and the release's own key layout to `release_out`."""
  from realcustom_jax.release import training  # pylint: disable=g-import-not-at-top
  if 'release_unet_config' not in checkpoint_config:
    raise ValueError('the checkpoint config lacks release_unet_config')
  training.export(params, checkpoint_config.get('model', {}),
                  checkpoint_config['release_unet_config'], out, step, release_out)
  return [out] + ([release_out] if release_out else [])


FAMILY = family_lib.Family(
    name='release', title="the authors' release (SDXL)",
    tiny_weights='tiny random release', no_adapter='written with the tiny release',
    missing_weights_message=paths.release_paths_message, check_word=check_word,
    check_training_config=check_training_config, supports_precompute=False,
    pipeline_from_config=pipeline_from_config,
    pipeline_from_pretrained=pipeline_from_pretrained, controls=controls(),
    **family_lib.sampling_from('realcustom_jax.release.sampler'),
    load_training_components=load_training_components,
    train_preprocess=train_preprocess, setup_training=setup_training,
    abstract_batch=abstract_batch, checkpoint_extras=checkpoint_extras, export=export)
