"""The one door to a model family and its pipeline: the paper's method or the authors'
release, decided once.

  from realcustom_jax.pipelines import load_pipeline
  pipe = load_pipeline(config)                     # what a config file names (configs/*.py)
  pipe = load_pipeline(pretrained='/models/sd15', vision_encoder='/models/clip-vit-l14',
                       adapter='adapter.safetensors')   # the paper's settings
  pipe = load_pipeline(pretrained='/models/sdxl-base-1.0', vision_encoder='/models/vision',
                       adapter='realcustom_highres.safetensors')   # the release's

  family = family_for(config)      # a `family.Family`: what the callers use instead of
                                   # asking which model they hold

A config's `pipeline` key names the family ('paper' when absent; configs/release*.py say
'release'); without a config, a converted release adapter's metadata does. This is the
one module that knows both families: the core (`realcustom_jax.*`) never imports the
release port (`realcustom_jax.release`), which imports the core. Importing it is cheap
(no JAX): the command lines call `family_name` and `needs_torch` before JAX starts.
"""
from typing import Optional

from realcustom_jax.release import paths as release_paths
from realcustom_jax.runtime import notices

FAMILIES = ('paper', 'release')


def family_name(config) -> str:
  """'paper' or 'release': a config's `pipeline` key (import-free, for early checks).

  Raises:
    ValueError: (one line) another value.
  """
  name = 'paper' if config is None else config.get('pipeline', 'paper')
  if name not in FAMILIES:
    raise ValueError(f'config.pipeline must be one of {FAMILIES}, got {name!r}')
  return name


def family_named(name: str):
  """The `family.Family` called `name`."""
  if name == 'release':
    from realcustom_jax.release import family as release_family  # pylint: disable=g-import-not-at-top
    return release_family.FAMILY
  if name == 'paper':
    from realcustom_jax import paper_family  # pylint: disable=g-import-not-at-top
    return paper_family.FAMILY
  raise ValueError(f'unknown model family {name!r}, expected one of {FAMILIES}')


def family_for(config):
  """The `family.Family` a config (or a checkpoint's config dict) asks for."""
  return family_named(family_name(config))


def adapter_family_name(path: Optional[str]) -> str:
  """'release' for the authors' converted release adapter (by its metadata), else 'paper'."""
  if not path:
    return 'paper'
  from realcustom_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  kind = adapter_lib.load_adapter_metadata(path).get('adapter_kind')
  return 'release' if kind == adapter_lib.RELEASE_KIND else 'paper'


def needs_torch(config) -> bool:
  """Whether using `config` first writes files that need torch (the tiny release's
  `.pth`); import-free, so a CLI can skip importing torch otherwise."""
  try:
    name = family_name(config)
  except ValueError:  # not an error here: the command line's checks name it in one line
    return False
  return name == 'release' and release_paths.tiny_release_pending(config)


def missing_weights_message(config) -> Optional[str]:
  """One line naming the weights a config for real ones lacks (either family), else
  None: for the command lines' checks before any model is built."""
  return family_for(config).missing_weights_message(config)


@notices.silences_flax_notice
def load_pipeline(config=None, *, pretrained: Optional[str] = None,
                  vision_encoder: Optional[str] = None, adapter: Optional[str] = None,
                  allow_pickle: bool = False):
  """The pipeline a config, or a set of local weights, asks for.

  Args:
    config: an ml_collections config (configs/tiny.py, laion.py, release.py, ...); its
      `pretrained`, `vision_encoder` and `adapter` keys name the files, and the
      keyword arguments, where given, override them. None: the weights named by the
      keyword arguments with the paper's (or, for a release adapter, the release's)
      settings.
    pretrained: a diffusers SD 1.x/2.x (paper) or SDXL (release) directory.
    vision_encoder: a CLIP vision directory (paper), or the directory holding the
      release's two timm ViT folders.
    adapter: the adapter `.safetensors` file (`train.export`, or
      `sample.convert_release` for the release).
    allow_pickle: accept torch `.bin` weights (unpickling runs code).

  Returns:
    A `family.Pipeline` (`RealCustomPipeline` or `ReleasePipeline`), called as
    `pipe(subjects, prompts, words, seed=..., settings=..., return_masks=...)`.

  Raises:
    ValueError: (one line) missing or unreadable files, or an adapter of the other kind.
  """
  if config is None:
    if not (pretrained and vision_encoder):
      raise ValueError('load_pipeline needs a config, or pretrained= and vision_encoder=')
    family = family_named(adapter_family_name(adapter))
    return family.pipeline_from_pretrained(pretrained, vision_encoder, adapter, allow_pickle)
  overrides = dict(pretrained=pretrained, vision_encoder=vision_encoder, adapter=adapter)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if allow_pickle:
    overrides['allow_pickle'] = True
  if overrides:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.update(overrides)
  return family_for(config).pipeline_from_config(config)
