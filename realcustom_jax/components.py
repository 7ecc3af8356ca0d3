"""Where the frozen models come from: one decision for the pipeline, trainer and CLIs.

`config.pretrained` names a local diffusers Stable Diffusion directory; empty, the tiny
random models of `config.tiny` are built in code. `config.vision_encoder` names a local
CLIP vision directory (required with `pretrained`; optional over the tiny models).
"""
from realcustom_jax import cli
from realcustom_jax import tiny
from realcustom_jax import weights


def load_components(config) -> tuple[weights.StableDiffusionComponents,
                                     weights.VisionEncoder]:
  """The frozen SD components and CLIP vision encoder that `config` names.

  Args:
    config: reads `pretrained`, `vision_encoder`, `allow_pickle`, and for the tiny
      models `tiny` and `resolution`.

  Returns:
    (StableDiffusionComponents, VisionEncoder).

  Raises:
    ValueError: (one line) weights missing for a config made for real ones, a
      `pretrained` without `vision_encoder`, or a directory that cannot be read
      (`weights.CheckpointError`).
  """
  missing = cli.missing_weights_message(config)
  if missing:
    raise ValueError(missing)
  allow_pickle = bool(config.get('allow_pickle', False))
  vision_dir = config.get('vision_encoder', '')
  if config.get('pretrained', ''):
    if not vision_dir:
      raise ValueError('config.vision_encoder must name a CLIP vision model directory '
                       'when config.pretrained is set')
    sd = weights.load_stable_diffusion(config.pretrained, allow_pickle=allow_pickle)
    return sd, weights.load_vision_encoder(vision_dir, allow_pickle=allow_pickle)
  sd, vision = tiny.build_tiny_components(config)
  if vision_dir:
    vision = weights.load_vision_encoder(vision_dir, allow_pickle=allow_pickle)
  return sd, vision


def load_tokenizer(config):
  """The CLIP tokenizer `config` names, without building any model (for early checks).

  Raises:
    ValueError: the pretrained directory has no readable tokenizer.
  """
  if config.get('pretrained', ''):
    return weights.load_tokenizer(config.pretrained)
  return tiny.build_tokenizer()
