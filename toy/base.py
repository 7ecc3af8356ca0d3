"""Trains the toy world's base text-to-image model from scratch, in the SD layout.

Stable Diffusion cannot be downloaded here, so the reproduction (benchmarks/
toy_reproduction.py) builds its own on the toy world (toy/world.py):

1. `train_vae`: diffusers' FlaxAutoencoderKL (two blocks: 16 px -> 8 x 8 x 4 latents),
   reconstruction MSE plus a small KL term, as SD's first stage (no GAN, no LPIPS).
2. `train_base`: the UNet (the project's `RealCustomUNet`, whose parameter tree is
   diffusers' FlaxUNet2DConditionModel's, at `config.tiny.unet`'s small width) and the
   CLIP text encoder, both from scratch and jointly, on epsilon prediction (Eqs. 1-2)
   over the VAE's latents. Captions name the identity for `named_fraction` of the rows
   and give the real word only otherwise; `caption_dropout` of the rows get the empty
   prompt, so classifier-free guidance works. A grounding term (TokenCompose's, weight
   `grounding_weight`) asks each role's cross-attention to fall on its region: the
   shape and colour words on the object, the background words on the background.
   Without it the word attention of this small base stayed near uniform (a global
   caption bias): the influence scope landed on the object no better than chance
   (docs/toy_reproduction.md, G0). Parameters are kept as an EMA (`ema_decay`).
3. `save_pretrained`: writes unet/, vae/, text_encoder/, tokenizer/, scheduler/ (Flax
   msgpack weights) and a CLIP vision directory (a frozen tiny random vision tower), so
   the real loading code (`weights.load_stable_diffusion` / `load_vision_encoder`) reads
   them and the adapter trains on them through `python -m train.main`.

Both trainings checkpoint with orbax (`CheckpointManager` over {params, opt_state,
step}) and resume from the latest checkpoint; step s draws its randomness from
fold_in(key, s), so a resumed run equals an uninterrupted one.

Config keys read: `config.tiny.*`, `config.resolution`, `config.seed` and
`config.toy.{vae_steps, vae_batch, vae_lr, vae_kl_weight, unet_steps, unet_batch,
unet_lr, unet_warmup, caption_dropout, named_fraction, grounding_weight, ema_decay,
text_length, checkpoint_every}`.
"""
import functools
import json
import os
import time
from typing import Any, Callable

from absl import logging
from diffusers import FlaxAutoencoderKL
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from transformers import CLIPImageProcessor

from realcustom_jax import clip
from realcustom_jax import encoders
from realcustom_jax.loading import tiny
from realcustom_jax.loading import weights
from realcustom_jax.schedules import alphas_cumprod
from realcustom_jax.unet import RealCustomUNet
from toy import world as toy_world

Array = jax.Array
# Fixed init keys of the frozen random encoders (as realcustom_jax.loading.tiny does).
_TEXT_SEED, _VISION_SEED = 2, 3


def build_tokenizer(max_length: int = 77):
  """The world's tokenizer: every caption word is one whole-word token.

  `max_length` is the padded prompt length (the text encoder's positions): the
  world's longest caption is 10 tokens with BOS and EOS.

  `tiny.build_tokenizer` chains each word's BPE merges in list order, so an earlier
  word's merge can split a later one ('r e' of "red" breaks "green"). Words that do not
  come out whole move to the front until all do (two rounds for the world's words).
  """
  words = list(toy_world.WORDS)
  for _ in range(len(words)):
    tokenizer = tiny.build_tokenizer(tuple(words))
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if not split:
      tokenizer.model_max_length = int(max_length)
      return tokenizer
    words = split + [w for w in words if w not in split]
  raise ValueError(f'cannot make {split} single tokens')


# ---------------------------------------------------------------------------------
# A resumable optax loop
# ---------------------------------------------------------------------------------


def _train_loop(name: str, workdir: str, params, loss_fn: Callable, optimizer,
                num_steps: int, checkpoint_every: int, seed: int,
                log_every: int = 100, ema_decay: float = 0.0) -> Any:
  """Minimises `loss_fn(params, step_key)` for `num_steps`, resuming from orbax checkpoints.

  Args:
    name: log name and checkpoint sub-directory (`workdir/name_ckpt`).
    workdir: the stage's directory.
    params: initial parameters (used when no checkpoint exists).
    loss_fn: (params, key) -> scalar loss; draws its own batch from `key`.
    optimizer: the optax transformation.
    num_steps: total steps.
    checkpoint_every: save interval, steps (the last step is always saved).
    seed: the loop key; step s uses fold_in(key, s).
    log_every: log interval, steps.
    ema_decay: > 0 keeps an exponential moving average of the parameters (checkpointed
      with them) and returns it instead of the last step's parameters.

  Returns:
    The trained parameters (their EMA with `ema_decay`).
  """
  # A copy: the jitted step donates its state, which must not delete the caller's arrays.
  params = jax.tree.map(jnp.copy, params)
  state = {'params': params, 'opt_state': optimizer.init(params),
           'step': jnp.zeros((), jnp.int32)}
  if ema_decay:
    state['ema'] = jax.tree.map(jnp.copy, params)
  mngr = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), f'{name}_ckpt'),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  latest = mngr.latest_step()
  if latest is not None:
    state = mngr.restore(latest, args=ocp.args.StandardRestore(state))
    logging.info('%s: resumed from step %d', name, latest)
  key = jax.random.PRNGKey(seed)

  @functools.partial(jax.jit, donate_argnums=0)
  def step_fn(state):
    loss, grads = jax.value_and_grad(loss_fn)(state['params'],
                                              jax.random.fold_in(key, state['step']))
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    new = {'params': optax.apply_updates(state['params'], updates),
           'opt_state': opt_state, 'step': state['step'] + 1}
    if ema_decay:
      new['ema'] = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
                                state['ema'], new['params'])
    return new, loss

  t0, losses = time.perf_counter(), []
  try:
    for step in range(int(state['step']) + 1, num_steps + 1):
      state, loss = step_fn(state)
      losses.append(loss)
      if step % log_every == 0 or step == num_steps:
        mean = float(np.mean(jax.device_get(losses)))
        losses = []
        if not np.isfinite(mean):
          raise FloatingPointError(f'{name}: non-finite loss at step {step}')
        logging.info('%s step %d/%d loss %.5f (%.1fs)', name, step, num_steps, mean,
                     time.perf_counter() - t0)
      if step % checkpoint_every == 0 or step == num_steps:
        mngr.save(step, args=ocp.args.StandardSave(state))
  finally:
    mngr.wait_until_finished()
    mngr.close()
  return state['ema'] if ema_decay else state['params']


# ---------------------------------------------------------------------------------
# Autoencoder
# ---------------------------------------------------------------------------------


def build_vae(config, scaling_factor: float = 1.0) -> FlaxAutoencoderKL:
  return FlaxAutoencoderKL.from_config(
      dict(tiny.vae_config(config), scaling_factor=float(scaling_factor)))


def _nchw(images_uint8: np.ndarray) -> jax.Array:
  return jnp.asarray(images_uint8.transpose(0, 3, 1, 2), jnp.float32) / 127.5 - 1.0


def train_vae(config, images: np.ndarray, workdir: str) -> dict:
  """Trains the autoencoder on (N, S, S, 3) uint8 images; returns its parameters."""
  toy = config.toy
  vae = build_vae(config)
  data = _nchw(images)
  batch = int(toy.vae_batch)

  def loss_fn(params, key):
    k_idx, k_z = jax.random.split(key)
    x = data[jax.random.randint(k_idx, (batch,), 0, data.shape[0])]
    posterior = vae.apply({'params': params}, x, method=vae.encode).latent_dist
    recon = vae.apply({'params': params}, posterior.sample(k_z), method=vae.decode).sample
    return jnp.mean(jnp.square(recon - x)) + toy.vae_kl_weight * jnp.mean(posterior.kl())

  params = jax.jit(vae.init_weights)(jax.random.PRNGKey(config.seed))
  return _train_loop('vae', workdir, params, loss_fn, optax.adam(float(toy.vae_lr)),
                     int(toy.vae_steps), int(toy.checkpoint_every), config.seed)


def encode_latents(vae: FlaxAutoencoderKL, params, images: np.ndarray,
                   batch: int = 256) -> np.ndarray:
  """(N, S, S, 3) uint8 -> (N, 4, h, w) posterior means (unscaled), in batches."""
  enc = jax.jit(lambda p, x: vae.apply({'params': p}, x, method=vae.encode).latent_dist.mean)
  out = [np.asarray(enc(params, _nchw(images[i:i + batch])))
         for i in range(0, len(images), batch)]
  return np.concatenate(out).transpose(0, 3, 1, 2)  # diffusers' Flax VAE gives NHWC


def decode_latents(vae: FlaxAutoencoderKL, params, latents: np.ndarray) -> np.ndarray:
  """(N, 4, h, w) unscaled latents -> (N, S, S, 3) uint8."""
  x = vae.apply({'params': params}, jnp.asarray(latents), method=vae.decode).sample
  x = np.clip((np.asarray(x).transpose(0, 2, 3, 1) + 1.0) * 127.5, 0, 255)
  return np.round(x).astype(np.uint8)


# ---------------------------------------------------------------------------------
# Text encoder and UNet
# ---------------------------------------------------------------------------------


def build_text_encoder(config, tokenizer) -> tuple[clip.CLIPTextModel, dict]:
  """The CLIP text encoder sized for the world's tokenizer, at a fixed random init."""
  model = clip.CLIPTextModel(clip.CLIPConfig.from_dict(
      tiny.text_config(config, tokenizer)))
  return model, clip.init_params(model, jax.random.PRNGKey(_TEXT_SEED))


def encode_captions(text_encoder, text_params, tokenizer, captions: list[str]) -> np.ndarray:
  """(len(captions), L, c_t) features, as the adapter training and the sampler see them."""
  ids = encoders.tokenize(tokenizer, captions)
  return np.asarray(encoders.encode_text(text_encoder, text_params, ids))


def role_weights(tokenizer, captions: list[str]) -> np.ndarray:
  """(N, 2, L) float32 token weights of each caption's object and background words.

  Every world word is one token, so word i of a caption is token i + 1 (after BOS).
  """
  length = tokenizer.model_max_length
  out = np.zeros((len(captions), 2, length), np.float32)
  for n, text in enumerate(captions):
    for role, positions in enumerate(toy_world.caption_roles(text)):
      out[n, role, [p + 1 for p in positions if p + 1 < length]] = 1.0
  return out


def build_unet(config) -> RealCustomUNet:
  """The base UNet: diffusers' parameter tree, the numerics the pipeline samples with."""
  return RealCustomUNet.from_config(tiny.unet_config(config))


def region_shares(maps: list[Array], object_masks: Array, valid: Array) -> Array:
  """Mean share of each role's word attention that falls on its region.

  Args:
    maps: per cross-attention layer (B, 2, h, w) word maps (object words, background
      words), each summed over its role's tokens and averaged over heads.
    object_masks: (B, S, S) float, 1 on the object.
    valid: (B, 2) float, 1 where the caption has words of that role.

  Returns:
    () the share in [0, 1], averaged over layers and valid (row, role) pairs.
  """
  shares = []
  for m in maps:
    h, w = m.shape[-2:]
    b, size = object_masks.shape[0], object_masks.shape[-1]
    obj = object_masks.reshape(b, h, size // h, w, size // w).mean(axis=(2, 4))
    region = jnp.stack([obj, 1.0 - obj], axis=1)
    inside = jnp.sum(m * region, axis=(-2, -1)) / (jnp.sum(m, axis=(-2, -1)) + 1e-8)
    shares.append(jnp.sum(inside * valid) / jnp.maximum(jnp.sum(valid), 1.0))
  return jnp.mean(jnp.stack(shares))


def train_base(config, latents: np.ndarray, object_masks: np.ndarray,
               named_ids: np.ndarray, plain_ids: np.ndarray, named_roles: np.ndarray,
               plain_roles: np.ndarray, empty_ids: np.ndarray, text_encoder,
               text_params: dict, workdir: str) -> tuple[dict, dict]:
  """Trains the UNet and the text encoder from scratch, jointly (see the module doc).

  Args:
    config: the config (`config.tiny.unet`, `config.toy.unet_*`, `config.toy.*` above).
    latents: (N, 4, h, w) scaled latents z_0.
    object_masks: (N, S, S) bool object masks of the images.
    named_ids, plain_ids: (N, L) token ids of each image's naming and real-word caption.
    named_roles, plain_roles: (N, 2, L) their role weights (`role_weights`).
    empty_ids: (L,) the empty prompt's ids (a dropped caption).
    text_encoder: the `clip.CLIPTextModel`; `text_params` its initial parameters.
    workdir: checkpoints go to `workdir/unet_ckpt`.

  Returns:
    (UNet parameters in diffusers' Flax layout, text encoder parameters), their EMA.
  """
  toy = config.toy
  unet = build_unet(config)
  z0 = jnp.asarray(latents, jnp.float32)
  masks = jnp.asarray(object_masks, jnp.float32)
  ids = jnp.stack([jnp.asarray(plain_ids, jnp.int32), jnp.asarray(named_ids, jnp.int32)], 1)
  roles = jnp.stack([jnp.asarray(plain_roles), jnp.asarray(named_roles)], 1)
  abar_table = jnp.asarray(alphas_cumprod(tiny.SCHEDULER_CONFIG))
  batch = int(toy.unet_batch)
  weight = float(toy.grounding_weight)

  def loss_fn(params, key):
    k_idx, k_t, k_n, k_drop, k_named = jax.random.split(key, 5)
    idx = jax.random.randint(k_idx, (batch,), 0, z0.shape[0])
    t = jax.random.randint(k_t, (batch,), 0, abar_table.shape[0])
    noise = jax.random.normal(k_n, (batch,) + z0.shape[1:])
    abar = abar_table[t][:, None, None, None]
    z_t = jnp.sqrt(abar) * z0[idx] + jnp.sqrt(1.0 - abar) * noise  # Eq. 2
    named = (jax.random.uniform(k_named, (batch,)) < toy.named_fraction).astype(jnp.int32)
    keep = jax.random.uniform(k_drop, (batch,)) >= toy.caption_dropout
    row_ids = ids[idx, named]
    # A dropped caption is the empty prompt: BOS, then EOS as padding (tokenize('')).
    row_ids = jnp.where(keep[:, None], row_ids, empty_ids[None])
    row_roles = roles[idx, named] * keep[:, None, None]
    text = text_encoder.apply({'params': params['text']}, row_ids).last_hidden_state
    pred, state = unet.apply({'params': params['unet']}, z_t, t, text,
                             word_weights=row_roles, mutable=['intermediates'])
    mse = jnp.mean(jnp.square(pred - noise))  # Eq. 1
    share = region_shares(jax.tree_util.tree_leaves(state['intermediates']),
                          masks[idx], (row_roles.sum(-1) > 0).astype(jnp.float32))
    return mse + weight * (1.0 - share)

  empty_ids = jnp.asarray(empty_ids, jnp.int32)
  init = jax.jit(lambda k: unet.init(k, z0[:1], jnp.zeros((1,), jnp.int32),
                                     jnp.zeros((1, ids.shape[-1], unet.cross_attention_dim))))
  params = {'unet': init(jax.random.PRNGKey(config.seed))['params'], 'text': text_params}
  lr = optax.warmup_cosine_decay_schedule(0.0, float(toy.unet_lr), int(toy.unet_warmup),
                                          int(toy.unet_steps), float(toy.unet_lr) * 0.1)
  out = _train_loop('unet', workdir, params, loss_fn, optax.adamw(lr, weight_decay=0.01),
                    int(toy.unet_steps), int(toy.checkpoint_every), config.seed + 1,
                    ema_decay=float(toy.ema_decay))
  return out['unet'], out['text']


# ---------------------------------------------------------------------------------
# On disk, in the diffusers / transformers layouts
# ---------------------------------------------------------------------------------


def _write_json(path: str, value: dict) -> None:
  with open(path, 'w') as f:
    json.dump(value, f, indent=2)


def _write_msgpack(path: str, params) -> None:
  with open(path, 'wb') as f:
    f.write(flax.serialization.to_bytes(jax.device_get(params)))


def save_pretrained(out_dir: str, config, unet_params, vae_params, scaling_factor: float,
                    text_params, tokenizer) -> tuple[str, str]:
  """Writes the trained base model and a tiny random CLIP vision tower.

  The layout is what `StableDiffusionPipeline.save_pretrained` writes, with Flax msgpack
  weights (torch-free to write and to read). `_class_name` is the torch class name, as
  the loader checks it.

  Returns:
    (sd_dir, vision_dir).
  """
  sd_dir, vision_dir = os.path.join(out_dir, 'sd'), os.path.join(out_dir, 'vision')
  for sub in ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'):
    os.makedirs(os.path.join(sd_dir, sub), exist_ok=True)
  _write_json(os.path.join(sd_dir, 'unet', 'config.json'),
              dict(tiny.unet_config(config), _class_name='UNet2DConditionModel'))
  _write_msgpack(os.path.join(sd_dir, 'unet', 'diffusion_flax_model.msgpack'), unet_params)
  _write_json(os.path.join(sd_dir, 'vae', 'config.json'),
              dict(tiny.vae_config(config), scaling_factor=float(scaling_factor),
                   _class_name='AutoencoderKL'))
  _write_msgpack(os.path.join(sd_dir, 'vae', 'diffusion_flax_model.msgpack'), vae_params)
  weights.save_clip_tower(os.path.join(sd_dir, 'text_encoder'),
                          tiny.text_config(config, tokenizer), text_params, 'text')
  tokenizer.save_pretrained(os.path.join(sd_dir, 'tokenizer'))
  _write_json(os.path.join(sd_dir, 'scheduler', 'scheduler_config.json'),
              dict(tiny.SCHEDULER_CONFIG))
  _write_json(os.path.join(sd_dir, 'model_index.json'), {
      '_class_name': 'StableDiffusionPipeline',
      'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
      'text_encoder': ['transformers', 'CLIPTextModel'],
      'tokenizer': ['transformers', 'CLIPTokenizer'],
      'scheduler': ['diffusers', 'DDIMScheduler']})

  vision_config = tiny.vision_config(config)
  vision = clip.CLIPVisionModel(clip.CLIPConfig.from_dict(vision_config))
  size = vision_config.image_size
  weights.save_clip_tower(vision_dir, vision_config,
                          clip.init_params(vision, jax.random.PRNGKey(_VISION_SEED)), 'vision')
  CLIPImageProcessor(size={'shortest_edge': size},
                     crop_size={'height': size, 'width': size}).save_pretrained(vision_dir)
  return sd_dir, vision_dir
