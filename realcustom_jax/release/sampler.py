"""The authors' release's sampling loop, built from the core sampler's pieces.

The release (github.com/bytedance/RealCustom, `inference/` and `pipeline.py`) guides
with two branches instead of Eq. 13's three:

  eps = eps_u + w (eps_TI2I - eps_u),

whose unconditional branch also has the visual input (the encoded negative image,
`Conditions.uncond_image`) gated by the same mask, both rows in ONE batched call. Its
T2I call serves the mask alone, so with `mask_reused_step=N` that pass sits in a
`lax.cond` inside the scan and is skipped from step N on (one UNet call of B rows less
per step). Everything else (the scan and the solver, the masks of `mask_strategies`,
several references, SDXL's added conditioning, the checks) is the core sampler's
(`realcustom_jax.sampler`); `settings.guidance_image` is the release's guidance scale
and `settings.guidance_text` is not read.
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from realcustom_jax import model as model_lib
from realcustom_jax import sampler
from realcustom_jax.schedules import Schedule

Array = jax.Array


def release_guidance(eps_uncond: Array, eps_image: Array, w=3.5) -> Array:
  """The release's guidance: eps_u + w (eps_TI2I - eps_u).

  `classifier_free_guidance_image_prompt_cascade` in its 'naive_global_direct' mode with
  rescale factor 0 (what its inference uses); eps_u has the negative prompt and the
  negative image. Eq. 13 with w_t = w_i = w and that eps_u.
  """
  return eps_uncond + w * (eps_image - eps_uncond)


def _release_loop(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
                  cond: sampler.Conditions, settings: sampler.GuidanceSettings, *,
                  return_trajectory: bool) -> sampler.SampleOutput:
  """The release's DDIM loop (traced once per static shape and flag set)."""
  b = latents.shape[0]
  size = sampler.scope_size(model, settings, latents.shape[2:])
  self_maps = sampler.reads_self_maps(settings)
  # Built once, outside the scan body.
  pair_text, pair_added = cond.pair_text, cond.pair_added
  pair_image = sampler.rows(cond.uncond_image, cond.image)

  def mask_pass(z, t):
    """The release's extra pass: T2I alone, for its maps; the scope."""
    _, maps, t2i_self_maps = sampler.text_only_maps(model, params, cond, z, t,
                                                    with_uncond=False, self_maps=self_maps)
    return sampler.step_scope(model, settings, maps, t2i_self_maps, size)

  def guided_step(z, carried, i, t, alpha_bar):
    if settings.mask_reused_step is not None:
      # A real branch: from step N on the mask pass does not run.
      scope = jax.lax.cond(sampler.mask_is_fresh(settings, i), mask_pass,
                           lambda z, t: carried, z, t)
    else:
      scope = mask_pass(z, t)
    # [uncond, TI2I] in ONE call, both gated by the scope (as the release's two calls).
    eps = model.apply(
        {'params': params}, jnp.concatenate([z, z], axis=0), jnp.full((2 * b,), t),
        pair_text, pair_image, sqrt_alpha_bar=jnp.full((2 * b,), jnp.sqrt(alpha_bar)),
        gamma_num=settings.gamma_num, scope_mask=jnp.concatenate([scope, scope], axis=0),
        **sampler.added_kwargs(pair_added))
    return release_guidance(eps[:b], eps[b:], settings.guidance_image), scope, None

  return sampler.scan_denoise(guided_step, schedule, latents,
                              sampler.initial_scope(cond, settings, b, size),
                              return_trajectory=return_trajectory)


def build_sampler(model: model_lib.RealCustom, *, return_trajectory: bool = False,
                  max_traces: Optional[int] = None) -> Callable[..., sampler.SampleOutput]:
  """A jitted release sampler: (params, schedule, latents, conditions, settings) ->
  SampleOutput; as `sampler.build_sampler`, it does not validate: use `sample`."""
  return sampler.jitted_loop(_release_loop, model, return_trajectory, max_traces)


@functools.lru_cache(maxsize=16)
def cached_sampler(model: model_lib.RealCustom, return_trajectory: bool):
  """One jitted release sampler per (model, flag); jax.jit caches per shape inside."""
  return build_sampler(model, return_trajectory=return_trajectory)


def sample(model: model_lib.RealCustom, params, schedule: Schedule, latents: Array,
           conditions: sampler.Conditions,
           settings: Optional[sampler.GuidanceSettings] = None, *,
           return_trajectory: bool = False) -> sampler.SampleOutput:
  """The release's sampling, checked as `sampler.sample` is.

  Args:
    conditions: as `sampler.sample`'s, with `uncond_image` (the negative image's
      features, of `image`'s shapes) required.
    settings: `guidance_image` is the release's guidance scale; the masks as in
      `sampler.GuidanceSettings`.
    (the others as `sampler.sample`'s.)

  Raises:
    ValueError: `sampler.sample`'s, or a missing negative image.
  """
  conditions, settings = sampler.check_subject_conditions(model, schedule, latents,
                                                          conditions, settings)
  if sampler.shapes(conditions.uncond_image) != sampler.shapes(conditions.image):
    raise ValueError("the release's guidance needs uncond_image (the negative image) of "
                     f"the image features' shapes {sampler.shapes(conditions.image)}, got "
                     f'{sampler.shapes(conditions.uncond_image)}')
  fn = cached_sampler(model, bool(return_trajectory))
  return fn(params, schedule, latents, conditions, settings)
