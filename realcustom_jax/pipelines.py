"""The one door to a pipeline: the paper's method or the authors' release, decided once.

  from realcustom_jax.pipelines import load_pipeline
  pipe = load_pipeline(config)                     # what a config file names (configs/*.py)
  pipe = load_pipeline(pretrained='/models/sd15', vision_encoder='/models/clip-vit-l14',
                       adapter='adapter.safetensors')   # the paper's settings
  pipe = load_pipeline(pretrained='/models/sdxl-base-1.0', vision_encoder='/models/vision',
                       adapter='realcustom_highres.safetensors')   # the release's

A release config (`config.pipeline == 'release'`, `release.paths.is_release_config`) or,
without a config, a converted release adapter (its metadata says so) gives
`release.pipeline.ReleasePipeline`; anything else `pipeline.RealCustomPipeline`. This is
the one module that knows both: the core (`realcustom_jax.*`) never imports the release
port (`realcustom_jax.release`), which imports the core.
"""
from typing import Optional, Union

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import pipeline as paper_pipeline
from realcustom_jax.release import paths as release_paths
from realcustom_jax.release import pipeline as release_pipeline
from realcustom_jax.loading import components

Pipeline = Union[paper_pipeline.RealCustomPipeline, release_pipeline.ReleasePipeline]


def is_release_adapter(path: Optional[str]) -> bool:
  """Whether `path` is the authors' converted release adapter (by its metadata)."""
  return bool(path) and adapter_lib.load_adapter_metadata(path).get(
      'adapter_kind') == adapter_lib.RELEASE_KIND


def missing_weights_message(config) -> Optional[str]:
  """One line naming the weights a config for real ones lacks (either kind), else None:
  for the command lines' checks before any model is built."""
  if release_paths.is_release_config(config):
    return release_paths.release_paths_message(config)
  return components.missing_weights_message(config)


def load_pipeline(config=None, *, pretrained: Optional[str] = None,
                  vision_encoder: Optional[str] = None, adapter: Optional[str] = None,
                  allow_pickle: bool = False) -> Pipeline:
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
    A `RealCustomPipeline` or a `ReleasePipeline`; both are called as
    `pipe(subjects, prompts, words, seed=..., return_masks=...)`.

  Raises:
    ValueError: (one line) missing or unreadable files, or an adapter of the other kind.
  """
  if config is None:
    if not (pretrained and vision_encoder):
      raise ValueError('load_pipeline needs a config, or pretrained= and vision_encoder=')
    if is_release_adapter(adapter):
      return release_pipeline.ReleasePipeline.from_pretrained(
          pretrained, vision_encoder, adapter, None, allow_pickle)
    return paper_pipeline.RealCustomPipeline.from_pretrained(
        pretrained, vision_encoder, adapter, None, allow_pickle)
  overrides = dict(pretrained=pretrained, vision_encoder=vision_encoder, adapter=adapter)
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if allow_pickle:
    overrides['allow_pickle'] = True
  if overrides:
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.update(overrides)
  if release_paths.is_release_config(config):
    return release_pipeline.ReleasePipeline.from_config(config)
  return paper_pipeline.RealCustomPipeline.from_config(config)
