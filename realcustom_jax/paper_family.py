"""The paper's model family (Sec. 3): Stable Diffusion + CLIP vision, the adaptive
scoring module (Eqs. 8-10), the influence scope (Eq. 11) and Eq. 13's guidance.

`FAMILY` is assembled from the core's own modules; `pipelines.family_for` hands it out.
Heavy modules are imported inside the fields, so choosing the family stays cheap.
"""
import json
from typing import Optional

from realcustom_jax import family as family_lib

def missing_weights_message(config) -> Optional[str]:
  from realcustom_jax.loading import components  # pylint: disable=g-import-not-at-top
  return components.missing_weights_message(config)


def check_word(config, prompt: str, word: str) -> None:
  """The CLIP tokenizer must find `word` as whole tokens of `prompt`."""
  from realcustom_jax import encoders  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import components  # pylint: disable=g-import-not-at-top
  encoders.word_token_indices(components.load_tokenizer(config), prompt, word)


def check_training_config(config) -> None:
  """ValueError (one line) for the paper's training keys and weights (Sec. 3.2)."""
  from realcustom_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  from realcustom_jax.adapter_training import SELECTION_GRADIENTS  # pylint: disable=g-import-not-at-top
  t = config.train
  if not 0.0 <= float(t.image_dropout) <= 1.0:
    raise ValueError(f'config.train.image_dropout must lie in [0, 1], got {t.image_dropout}')
  low, high = (float(x) for x in t.gamma_num_range)
  if not 0.0 <= low <= high <= 1.0:
    raise ValueError(f'config.train.gamma_num_range must satisfy 0 <= low <= high <= 1, '
                     f'got {tuple(t.gamma_num_range)}')
  gradient = t.get('selection_gradient', 'none')
  if gradient not in SELECTION_GRADIENTS:
    raise ValueError(f'config.train.selection_gradient must be one of '
                     f'{SELECTION_GRADIENTS}, got {gradient!r}')
  if gradient != 'none' and config.model.get('scoring', 'adaptive') != 'adaptive':
    raise ValueError("config.train.selection_gradient needs config.model.scoring="
                     "'adaptive' (there is no selection to learn without it)")
  check_score_supervision(config)
  if t.get('visual_kv_init', 'zero_v') not in adapter_lib.VISUAL_KV_INITS:
    raise ValueError(f'config.train.visual_kv_init must be one of '
                     f'{adapter_lib.VISUAL_KV_INITS}, got {t.visual_kv_init!r}')
  message = missing_weights_message(config)
  if message:
    raise ValueError(message)
  if config.pretrained and not config.vision_encoder:
    raise ValueError('config.vision_encoder (a CLIP vision model directory) is required '
                     'with config.pretrained')


def check_score_supervision(config) -> None:
  """ValueError (one line) for config.train.score_supervision and its keys."""
  from realcustom_jax.adapter_training import SCORE_SUPERVISIONS  # pylint: disable=g-import-not-at-top
  t = config.train
  supervision = t.get('score_supervision', 'none')
  if supervision not in SCORE_SUPERVISIONS:
    raise ValueError(f'config.train.score_supervision must be one of {SCORE_SUPERVISIONS}, '
                     f'got {supervision!r}')
  if supervision == 'none':
    return
  weight = t.get('score_supervision_weight', 0.1)
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
    raise ValueError('config.train.score_supervision_weight must be a number >= 0, got '
                     f'{weight!r}')
  words = t.get('subject_words', ())
  if (isinstance(words, str) or not words
      or not all(isinstance(w, str) and w.strip() for w in words)):
    raise ValueError("config.train.score_supervision='word_map' needs "
                     "config.train.subject_words, a tuple of the caption words that name "
                     f"subjects (e.g. ('toy', 'dog')), got {words!r}")
  if config.model.get('scoring', 'adaptive') != 'adaptive':
    raise ValueError("config.train.score_supervision needs config.model.scoring="
                     "'adaptive' (there are no score nets without it)")
  if config.data.get('subject_reference', 'self') != 'self':
    raise ValueError("config.train.score_supervision needs config.data.subject_reference="
                     "'self': the word map locates the subject in the training image, "
                     "which is the subject's reference only then")
  if config.data.get('precompute_features', False):
    raise ValueError('config.train.score_supervision needs the captions, which '
                     'precomputed features do not keep: set '
                     'config.data.precompute_features=False')


# ---- Sampling ----


def pipeline_from_config(config):
  from realcustom_jax import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.RealCustomPipeline.from_config(config)


def pipeline_from_pretrained(pretrained: str, vision_encoder: str, adapter: Optional[str],
                             allow_pickle: bool = False):
  from realcustom_jax import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.RealCustomPipeline.from_pretrained(pretrained, vision_encoder, adapter,
                                                     None, allow_pickle)


def _defaults(s) -> dict:
  return dict(guidance_text=float(s.get('guidance_text', 7.5)),
              guidance_image=float(s.get('guidance_image', 12.5)),
              gamma_scope=float(s.get('gamma_scope', 0.25)),
              gamma_num=float(s.get('gamma_num', 0.8)),
              scope='binary' if s.get('binary_mask', False) else 'soft')


def _settings(sampler_config, values: dict):
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  scope = values['scope']
  if scope not in ('soft', 'binary'):
    raise ValueError(f"scope must be 'soft' or 'binary', got {scope!r}")
  return sampler.GuidanceSettings.from_config(
      sampler_config, guidance_text=values['guidance_text'],
      guidance_image=values['guidance_image'], gamma_scope=values['gamma_scope'],
      gamma_num=values['gamma_num'], binary_mask=scope == 'binary')


CONTROLS = family_lib.GuidanceControls(
    controls=(
        family_lib.Control('guidance_text', 'w_t (text guidance, Eq. 13)', maximum=20,
                           step=0.1, elem_id='w_t'),
        family_lib.Control('guidance_image', 'w_i (image guidance, Eq. 13)', maximum=30,
                           step=0.1, elem_id='w_i'),
        family_lib.Control('gamma_scope', 'gamma_scope (Eq. 11: share of the image in the '
                           'scope)'),
        family_lib.Control('gamma_num', 'gamma_num (Eq. 10: share of subject tokens kept)'),
        family_lib.Control('scope', 'Influence scope', kind='choice',
                           choices=('soft', 'binary'), static=True)),
    defaults=_defaults,
    settings=_settings,
    plain_scale=lambda settings: settings.guidance_text,
    describe=lambda settings: f', {"binary" if settings.binary_mask else "soft"} scope',
    static_words='soft/binary')


# ---- Training ----


def load_training_components(config):
  """(StableDiffusionComponents, VisionEncoder)."""
  from realcustom_jax.loading import components  # pylint: disable=g-import-not-at-top
  return components.load_components(config)


def train_preprocess(config, loaded):
  import functools  # pylint: disable=g-import-not-at-top
  from realcustom_jax import training_inputs  # pylint: disable=g-import-not-at-top
  del config
  sd, _ = loaded
  return training_inputs.TrainPreprocess(
      functools.partial(training_inputs.tokenize_caption, sd.tokenizer))


def setup_training(config, mesh, loaded, with_encoders: bool = True):
  from realcustom_jax import adapter_training  # pylint: disable=g-import-not-at-top
  sd, vision = loaded
  return adapter_training.setup_training(config, mesh, sd, vision,
                                         with_encoders=with_encoders)


def abstract_batch(config, loaded, shapes: dict, batch_size: int) -> dict:
  """Images in [-1, 1] and token ids (and the stored reference, when the set has one)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from realcustom_jax import training_inputs  # pylint: disable=g-import-not-at-top
  del loaded
  res = int(config.resolution)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, res, res, 3), np.float32),
           'input_ids': jax.ShapeDtypeStruct((batch_size, shapes['text'][0]), np.int32)}
  if training_inputs.stored_reference(config):
    batch['reference'] = batch['image']
  return batch


def export(params, checkpoint_config: dict, out: str, step: int,
           release_out: Optional[str] = None) -> list[str]:
  """The adapter file `load_pipeline` reads (its model config in the metadata); a paper
  run has no other key layout, so `release_out` is ignored."""
  from realcustom_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  del release_out
  metadata = {'model_config': json.dumps(checkpoint_config.get('model', {}), sort_keys=True),
              'step': str(step),
              # Checkpoints from before the layout number are layout 1: exported as
              # such, so that loading refuses them by name.
              'adapter_layout': str(checkpoint_config.get('adapter_layout', 1))}
  adapter_lib.save_adapter(out, params, metadata)
  return [out]


FAMILY = family_lib.Family(
    name='paper', title="the paper's pipeline (SD + CLIP)",
    tiny_weights='tiny embedded default', no_adapter='none: UNTRAINED adapter',
    missing_weights_message=missing_weights_message, check_word=check_word,
    check_training_config=check_training_config, supports_precompute=True,
    pipeline_from_config=pipeline_from_config,
    pipeline_from_pretrained=pipeline_from_pretrained, controls=CONTROLS,
    **family_lib.sampling_from('realcustom_jax.sampler'),
    load_training_components=load_training_components,
    train_preprocess=train_preprocess, setup_training=setup_training,
    abstract_batch=abstract_batch, checkpoint_extras=lambda loaded: {}, export=export)
