"""What the paper's and the release's pipelines share: the output, the batch check, the
VAE decoder, the decoded trajectory and the Fig. 6 mask grid.
"""
import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from realcustom_jax import sampler
from realcustom_jax.runtime import notices


@dataclasses.dataclass
class RealCustomOutput:
  """What the pipeline returns.

  Attributes:
    images: B generated PIL RGB images.
    masks: (steps, B, H, W) float32 influence scope at every step (return_masks).
    x0: (steps, B, res, res, 3) uint8 decoded x0 prediction at every step (return_masks).
  """
  images: list[Image.Image]
  masks: Optional[np.ndarray] = None
  x0: Optional[np.ndarray] = None


def vae_decoder(vae, scaling_factor: float):
  """A jitted (vae_params, latents) -> (B, H, W, 3) uint8 images function (SD and SDXL)."""
  def decode(p, latents):
    x = vae.apply({'params': p}, latents / scaling_factor, method=vae.decode).sample
    # [-1, 1] NCHW -> [0, 255] NHWC uint8, on device.
    x = jnp.clip(x.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(jnp.transpose(x, (0, 2, 3, 1)) * 255).astype(jnp.uint8)
  # Tracing builds diffusers' Flax VAE modules, each logging its deprecation notice.
  return notices.silences_flax_notice(jax.jit(decode))


def check_batch(subjects, prompts, words) -> int:
  """The batch size B of a pipeline call; ValueError for lists that do not pair up."""
  for name, value in (('subjects', subjects), ('prompts', prompts), ('words', words)):
    if isinstance(value, (str, Image.Image)) or not isinstance(value, Sequence) or not value:
      raise ValueError(f'{name} must be a non-empty list, got {value!r}')
  b = len(prompts)
  if len(words) != b:
    raise ValueError(f'need one word per prompt: {b} prompts, {len(words)} words')
  if len(subjects) not in (1, b):
    raise ValueError(f'need one subject, or one per prompt: {b} prompts, '
                     f'{len(subjects)} subjects')
  return b


def given_settings(settings: Optional[sampler.GuidanceSettings],
                   make: Callable[[], sampler.GuidanceSettings],
                   **values) -> sampler.GuidanceSettings:
  """A pipeline call's settings: `settings` when given (then every value must be None),
  else `make()` (the values over the config's)."""
  if settings is None:
    return make()
  given = [k for k, v in values.items() if v is not None]
  if given:
    raise ValueError(f'pass either settings= or {", ".join(given)}, not both')
  if not isinstance(settings, sampler.GuidanceSettings):
    raise ValueError('settings must be a sampler.GuidanceSettings, got '
                     f'{type(settings).__name__}')
  return settings


def initial_latents(seed: int, batch: int, channels: int, hw: tuple[int, int]) -> jax.Array:
  """z_T ~ N(0, 1) of (batch, channels, h, w) (both pipelines' schedules start at sigma 1)."""
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, channels) + tuple(hw),
                           jnp.float32)


def decoded_output(decode: Callable[[jax.Array], np.ndarray], out: sampler.SampleOutput,
                   return_masks: bool) -> RealCustomOutput:
  """The images of a sampler output, and with `return_masks` every step's scope and
  decoded x0 prediction (one decode call per step: one compile, bounded memory)."""
  images = [Image.fromarray(x) for x in decode(out.latents)]
  if not return_masks:
    return RealCustomOutput(images)
  x0 = np.stack([decode(out.x0[s]) for s in range(out.x0.shape[0])])
  return RealCustomOutput(images, np.asarray(out.masks), x0)


def save_mask_grid(output: RealCustomOutput, path: str, steps: Optional[Sequence[int]] = None,
                   index: int = 0, columns: int = 5) -> None:
  """Writes a Fig. 6-style picture: the scope (grey, upsampled) above the x0 prediction.

  Args:
    output: a pipeline output made with `return_masks=True`.
    path: the image file to write (e.g. .png).
    steps: which steps to show; default `columns` steps evenly spaced, last included.
    index: which batch row.
    columns: number of steps when `steps` is None.

  Raises:
    ValueError: without masks, or for a step / row out of range.
  """
  if output.masks is None or output.x0 is None:
    raise ValueError('the output has no masks: call the pipeline with return_masks=True')
  n_steps, batch = output.masks.shape[:2]
  if not 0 <= index < batch:
    raise ValueError(f'row {index} out of range for batch {batch}')
  if steps is None:
    steps = sorted({int(round(s)) for s in np.linspace(0, n_steps - 1, min(columns, n_steps))})
  for s in steps:
    if not 0 <= s < n_steps:
      raise ValueError(f'step {s} out of range for {n_steps} steps')
  size = output.x0.shape[2]
  tile = max(size, 64)  # tiny outputs are upscaled so the grid stays legible
  grid = Image.new('RGB', (tile * len(steps), 2 * tile), 'white')
  for col, s in enumerate(steps):
    mask = np.clip(output.masks[s, index], 0.0, 1.0)
    mask_img = Image.fromarray(np.round(mask * 255).astype(np.uint8), 'L').resize(
        (tile, tile), Image.Resampling.NEAREST).convert('RGB')
    x0_img = Image.fromarray(output.x0[s, index]).resize((tile, tile),
                                                         Image.Resampling.BILINEAR)
    grid.paste(mask_img, (col * tile, 0))
    grid.paste(x0_img, (col * tile, tile))
  grid.save(path)
