"""Where the frozen models come from: one decision for the pipeline, trainer and CLIs.

`config.pretrained` names a local diffusers Stable Diffusion directory; empty, the tiny
random models of `config.tiny` are built in code. `config.vision_encoder` names a local
CLIP vision directory (required with `pretrained`; optional over the tiny models).
"""
from realcustom_jax.loading import tiny
from realcustom_jax.loading import weights


def missing_weights_message(config) -> str | None:
  """Says which keys to set when a config for real weights has none; else None.

  Without `config.pretrained` the tiny random models are built, and they only take the
  resolution their VAE factor and UNet sample size give. A config made for real weights
  (`configs/laion.py`, 512 px) would otherwise fail on that size mismatch.

  Args:
    config: the run config.

  Returns:
    A one-line message, or None when the config is usable as it is.
  """
  if config.get('pretrained') or 'tiny' not in config:
    return None
  try:
    tiny.vae_config(config)
  except ValueError as e:
    return ('this config needs local weights (configs/laion.py: Stable Diffusion 1.5 '
            'at 512 px): set --config.pretrained=DIR (a diffusers SD 1.x/2.x directory) '
            'and --config.vision_encoder=DIR (a CLIP vision model directory); without '
            f'them the tiny random models are built, and {e}')
  return None


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
  missing = missing_weights_message(config)
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
