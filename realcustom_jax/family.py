"""What a model family is: everything that differs between the paper's model and the
authors' release, declared once as fields, so callers never ask which one they hold.

  from realcustom_jax import pipelines
  family = pipelines.family_for(config)      # chosen once, from the config
  pipe = family.pipeline_from_config(config)
  settings = family.controls.settings(config.sampler, family.controls.defaults(config.sampler))

Two families exist: `paper_family.FAMILY` (Sec. 3: SD + CLIP, Eqs. 8-13) and
`release.family.FAMILY` (the authors' released SDXL model). `pipelines` is the one module
that knows both; the core (this file included) never imports the release port.
"""
import dataclasses
import importlib
from typing import Any, Callable, Optional, Protocol, Sequence

# A config is an ml_collections.ConfigDict (or, read back from a checkpoint, a dict).
Config = Any


@dataclasses.dataclass(frozen=True)
class Control:
  """One guidance control of a family, as the web demo draws it and its API names it.

  Attributes:
    name: the keyword of `GuidanceControls.settings` and the page's element id.
    label: what the page says next to it.
    kind: 'slider' (a number), 'choice' (one of `choices`) or 'choices' (a subset).
    minimum, maximum, step: a slider's range; maximum None: the server's --max_steps.
    choices: what a 'choice' or 'choices' control offers.
    integer: a slider of whole numbers.
    elem_id: the page's element id, when not `name`.
    static: whether a change selects another compiled sampler (the page says so).
  """
  name: str
  label: str
  kind: str = 'slider'
  minimum: float = 0.0
  maximum: Optional[float] = 1.0
  step: float = 0.01
  choices: tuple[str, ...] = ()
  integer: bool = False
  elem_id: str = ''
  static: bool = False

  @property
  def short(self) -> str:
    """The name messages use: the label before its explanation ('w_t')."""
    return self.label.split(' (')[0]


@dataclasses.dataclass(frozen=True)
class GuidanceControls:
  """A family's guidance settings as one described object (names, ranges, defaults).

  Attributes:
    controls: the controls, in the page's order.
    defaults: config.sampler -> {control name: first value}.
    settings: (config.sampler, {control name: value}) -> sampler.GuidanceSettings;
      ValueError (one line) for a value out of range.
    plain_scale: GuidanceSettings -> the classifier-free scale of the plain
      text-to-image images drawn beside (the paper's w_t, the release's one scale).
    describe: GuidanceSettings -> its static part in words (', soft scope').
    static_words: the static controls in words, for the page's compile note.
  """
  controls: tuple[Control, ...]
  defaults: Callable[[Config], dict]
  settings: Callable[[Config, dict], Any]
  plain_scale: Callable[[Any], float]
  describe: Callable[[Any], str]
  static_words: str

  @property
  def names(self) -> list[str]:
    return [c.name for c in self.controls]


class Pipeline(Protocol):
  """What both families' pipelines offer (`RealCustomPipeline`, `ReleasePipeline`).

  Their own guidance keywords (w_t / w_i / gamma_* for the paper; guidance_scale /
  mask_scope / mask_reused_step for the release) may be passed to `__call__` as well;
  `settings` carries them as one object made by the family's `controls`.
  """
  config: Config
  model: Any
  params: Any

  def __call__(self, subjects: Sequence[Any], prompts: Sequence[str], words: Sequence[str],
               *, seed: int = 0, num_steps: Optional[int] = None, settings: Any = None,
               return_masks: bool = False, **guidance) -> Any: ...

  def schedule(self, num_steps: Optional[int] = None) -> Any: ...

  def encode(self, subjects: Sequence[Any], prompts: Sequence[str],
             words: Sequence[str]) -> Any: ...

  def initial_latents(self, seed: int, batch: int) -> Any: ...

  def decode(self, latents: Any) -> Any: ...

  def check_word(self, prompt: str, word: str) -> None: ...


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: the fields callers use instead of testing which family they hold.

  Config and weights (before any model loads):
    name: 'paper' or 'release' (`config.pipeline`).
    title: the family in words, for logs and the web demo.
    tiny_weights: what the config's embedded default weights are, in words.
    no_adapter: what running without `config.adapter` means, in words.
    missing_weights_message: config -> one line naming what real weights lack, or None.
    check_word: (config, prompt, word) -> None; ValueError (one line) when the family's
      tokenizer will not find `word` in `prompt`.
    check_training_config: config -> None; ValueError (one line) for the family's
      training keys and weights.
    supports_precompute: whether `config.data.precompute_features` can train it.

  Sampling:
    pipeline_from_config: config -> Pipeline.
    pipeline_from_pretrained: (pretrained, vision_encoder, adapter, allow_pickle) ->
      Pipeline with the family's settings.
    controls: the guidance settings the web demo offers (`GuidanceControls`).
    sample: the family's checked sampling loop, `sampler.sample`'s signature (model,
      params, schedule, latents, conditions, settings, *, return_trajectory).
    cached_sampler: (model, return_trajectory) -> that loop's jitted function (its
      compile cache is the web demo's no-retrace counter).

  Training (train.train_and_evaluate):
    load_training_components: config -> the frozen models (float32).
    train_preprocess: (config, components) -> the loader's per-record grain transform.
    setup_training: (config, mesh, components, with_encoders) -> (TrainSetup, shapes).
    abstract_batch: (config, components, shapes, batch) -> the batch's ShapeDtypeStructs.
    checkpoint_extras: components -> keys added to the checkpoint's config (what export
      needs besides the parameters).
    export: (params, checkpoint config dict, out, step, release_out) -> files written.
  """
  name: str
  title: str
  tiny_weights: str
  no_adapter: str
  missing_weights_message: Callable[[Config], Optional[str]]
  check_word: Callable[[Config, str, str], None]
  check_training_config: Callable[[Config], None]
  supports_precompute: bool
  pipeline_from_config: Callable[[Config], Pipeline]
  pipeline_from_pretrained: Callable[..., Pipeline]
  controls: GuidanceControls
  sample: Callable[..., Any]
  cached_sampler: Callable[[Any, bool], Any]
  load_training_components: Callable[[Config], Any]
  train_preprocess: Callable[[Config, Any], Any]
  setup_training: Callable[..., tuple[Any, dict]]
  abstract_batch: Callable[[Config, Any, dict, int], dict]
  checkpoint_extras: Callable[[Any], dict]
  export: Callable[..., list[str]]


def sampling_from(module: str) -> dict[str, Callable[..., Any]]:
  """A family's `sample` and `cached_sampler` fields: those of the sampler `module`
  (dotted name), imported on first use so that choosing a family stays import-free."""
  def sample(*args, **kwargs):
    return importlib.import_module(module).sample(*args, **kwargs)

  def cached_sampler(model, return_trajectory: bool):
    return importlib.import_module(module).cached_sampler(model, return_trajectory)

  return {'sample': sample, 'cached_sampler': cached_sampler}
