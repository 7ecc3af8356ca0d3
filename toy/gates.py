"""The gates of the toy reproduction: each stage checked before the next relies on it.

- G0, the base draws identities through text: plain T2I with the caption that names
  the identity ("a red and white circle on a blue background") renders it on held-out
  identities, the real word alone does not (the `named_prompt` and `plain_t2i`
  variants of toy/reproduction.py; scored there).
- G1, the visual path carries what the text path carries (`visual_path_check`): the
  visual tokens are the text features of the naming caption, the visual K/V copies of
  the text K/V, the scope all ones, nothing trained.
- G2, the adapter can copy (`copy_errors`): on training images whose subject is the
  image itself, the trained adapter's noise error is below the no-subject and the
  shuffled-subject errors.
- G3, transfer: the `realcustom` variant on held-out identities (toy/reproduction.py).
"""
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import schedules

Array = jax.Array


@functools.partial(jax.jit, static_argnums=0)
def _guided_sample(unet, cond_params, uncond_params, schedule, latents: Array, text: Array,
                   uncond: Array, visual: Array, w_t: Array) -> Array:
  """DDIM with classifier-free guidance; the conditional branch (`cond_params`) also
  sees `visual` tokens through every attn2's visual K/V (no scope: every position), the
  unconditional branch is the base UNet on the empty prompt."""
  keep = jnp.ones(visual.shape[:2], bool)

  def step(z, xs):
    t, alpha_bar, alpha_bar_prev = xs
    tt = jnp.full((z.shape[0],), t)
    eps_u = unet.apply({'params': uncond_params}, z, tt, uncond)
    eps_c = unet.apply({'params': cond_params}, z, tt, text, visual_tokens=visual,
                       visual_token_mask=keep)
    z, _ = schedules.ddim_step(z, eps_u + w_t * (eps_c - eps_u), alpha_bar, alpha_bar_prev,
                               schedule)
    return z, None

  z, _ = jax.lax.scan(step, latents, (schedule.timesteps, schedule.alpha_bar,
                                      schedule.alpha_bar_prev))
  return z


def _map_attn2(tree: Mapping, fn, path=()) -> dict:
  """`tree` with fn(name, leaf_dict) applied to every attn2's projections."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping) and path and path[-1] == 'attn2' and 'kernel' in v:
      out[k] = fn(k, v)
    elif isinstance(v, Mapping):
      out[k] = _map_attn2(v, fn, path + (k,))
    else:
      out[k] = v
  return out


def g1_params(unet_params: Mapping, adapter_unet: Mapping, text_off: bool = False) -> dict:
  """The UNet with each attn2's visual K/V copied from its text K/V (nothing trained).

  Args:
    unet_params: the frozen base UNet.
    adapter_unet: an adapter's 'unet' subtree (gives the visual K/V leaves their place).
    text_off: also zero every attn2's text `to_v`, so the text branch adds nothing and
      the output is the visual branch's alone.
  """
  full = adapter_lib.init_visual_kv(
      adapter_lib.merge_params({'unet': dict(unet_params)}, {'unet': adapter_unet}),
      'copy_text')['unet']
  if text_off:
    full = _map_attn2(full, lambda k, v: {**v, 'kernel': jnp.zeros_like(v['kernel'])}
                      if k == 'to_v' else v)
  return full


def visual_path_check(unet, unet_params: Mapping, adapter_unet: Mapping, schedule,
                      latents: Array, plain_text: Array, named_text: Array, uncond: Array,
                      w_t: float) -> dict[str, Array]:
  """G1: samples where the subject's identity comes in through the visual branch only.

  Returns (B, C, h, w) final latents of:
    'g1_eq4_sum': text path = the real-word caption, visual tokens = the naming caption's
      features (Eq. 4: the two attention outputs are summed).
    'g1_visual_only': the same with the text branch's V zeroed: the naming caption
      reaches the image through the visual branch alone, so this must match the naming
      prompt through the text path (the `named_prompt` variant) if the visual branch is
      wired right.
    'g1_doubled': text path AND visual tokens = the naming caption: what Eq. 4's sum does
      to a text-sized visual output (twice the attention output).
  And 'visual_only_vs_text_max_abs': the largest difference of the noise prediction
  between the visual-only UNet fed the naming caption visually and the base UNet fed it
  as text, at the first step (0 up to float error when the branch is right).
  """
  base = dict(unet_params)
  copied = g1_params(unet_params, adapter_unet)
  text_off = g1_params(unet_params, adapter_unet, text_off=True)
  w = jnp.float32(w_t)
  out = {
      'g1_eq4_sum': _guided_sample(unet, copied, base, schedule, latents, plain_text,
                                   uncond, named_text, w),
      'g1_visual_only': _guided_sample(unet, text_off, base, schedule, latents, plain_text,
                                       uncond, named_text, w),
      'g1_doubled': _guided_sample(unet, copied, base, schedule, latents, named_text,
                                   uncond, named_text, w),
  }
  t = jnp.full((latents.shape[0],), schedule.timesteps[0])
  keep = jnp.ones(named_text.shape[:2], bool)
  visual = unet.apply({'params': text_off}, latents, t, plain_text, visual_tokens=named_text,
                      visual_token_mask=keep)
  text = unet.apply({'params': base}, latents, t, named_text)
  out['visual_only_vs_text_max_abs'] = jnp.max(jnp.abs(visual - text))
  return out


def copy_inputs(pipe, num_images: int, resolution: int, seed: int):
  """G2's inputs: the first `num_images` training scenes of the world's shards (`seed`),
  images the adapters trained on, each its own subject.

  Returns:
    ((N, C, h, w) scaled latents z_0, the pipeline's Conditions of their real-word
    captions and their own images).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from toy import base as toy_base  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  scenes = list(toy_world.iter_scenes(num_images, resolution, seed))
  images = np.stack([toy_world.render(sc, resolution)[0] for sc in scenes])
  c = pipe.components
  z0 = toy_base.encode_latents(c.vae, c.vae_params, images) * c.scaling_factor
  cond = pipe.encode([Image.fromarray(x) for x in images], [sc.caption for sc in scenes],
                     [sc.shape for sc in scenes])
  return z0, cond


def copy_errors(model, params, z0: Array, text: Array, image: Array,
                scheduler_config: dict, timesteps=(100, 400, 700), draws: int = 4,
                seed: int = 0) -> dict[str, dict[str, float]]:
  """G2: noise MSE with the subject = the image, a shuffled subject, and no subject.

  Args:
    model: the RealCustom module; `params` its full parameters (base + adapter).
    z0: (N, C, h, w) scaled latents of training images.
    text: (N, n_t, c_t) their captions' features (the real word only).
    image: (N, n_i, c_i) their own CLIP tokens (the subject = the image).
    scheduler_config: the base's noise schedule.
    timesteps: where to measure.
    draws: noise draws per image and timestep.
    seed: of the noise.

  Returns:
    {str(t): {'subject', 'shuffled', 'none', 'margin_vs_none', 'margin_vs_shuffled'}}:
    mean squared errors and the relative margins (1 - subject / other).
  """
  abar = schedules.alphas_cumprod(scheduler_config)
  shuffled = jnp.roll(image, 1, axis=0)

  @jax.jit
  def errors(key, t):
    noise = jax.random.normal(key, z0.shape)
    a = jnp.asarray(abar)[t]
    z_t = jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * noise
    tt = jnp.full((z0.shape[0],), t)
    sab = jnp.full((z0.shape[0],), jnp.sqrt(a))
    mse = lambda eps: jnp.mean(jnp.square(eps - noise))
    run = lambda img: model.apply({'params': params}, z_t, tt, text, img,
                                  sqrt_alpha_bar=sab, gamma_num=1.0)
    return jnp.stack([mse(run(image)), mse(run(shuffled)),
                      mse(model.apply({'params': params}, z_t, tt, text))])

  out = {}
  key = jax.random.PRNGKey(seed)
  for t in timesteps:
    e = np.mean([np.asarray(errors(jax.random.fold_in(key, d * 1000 + t), t))
                 for d in range(draws)], axis=0)
    out[str(t)] = {'subject': float(e[0]), 'shuffled': float(e[1]), 'none': float(e[2]),
                   'margin_vs_none': float(1.0 - e[0] / e[2]),
                   'margin_vs_shuffled': float(1.0 - e[0] / e[1])}
  return out
