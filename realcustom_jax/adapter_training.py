"""The RealCustom adapter train step (Sec. 3.2) on a frozen Stable Diffusion.

Only the adapter trains: the adaptive scoring module, the visual projection and the
visual K/V of every attn2. The UNet, the VAE and both CLIP encoders are frozen and are
passed to the step separately from the train state, so the optimizer state holds
adapter leaves only. One step (one `jax.jit`, encoders included):

  z_0 = scaling_factor * VAE(x)              f_ct = CLIP_text(caption)
  f_ci = CLIP_vision(x) (penultimate patch tokens of the same image)
  t ~ U{0..T-1}, eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps   (Eq. 2)
  gamma_num ~ U[low, high] per sample                                          (Eq. 10)
  image dropout: the subject is dropped for a fraction of rows (guidance training)
  loss = || eps - eps_theta(z_t, t, f_ct, f_ci) ||^2                           (Eq. 1)

With precomputed features (`config.data.precompute_features`, train/precompute.py) the
encoders ran once over the data set: `precomputed_train_step` takes the stored
posterior moments and CLIP features and draws z_0 = s (mean + std * eps) with the same
randomness as `train_step`, so both steps see the same eps, t and gamma_num.

Kept free of the data pipeline (grain, tfds) and of checkpointing, so benchmarks and
tests build and run the step without them; the loop is `train/train.py`.
Config keys read: `config.model.*`, `config.seed`, `config.resolution` and
`config.train.{learning_rate, weight_decay, warmup_steps, grad_clip_norm, adam_b1,
adam_b2, gamma_num_range, image_dropout, frozen_dtype}`.
"""
import dataclasses
import functools
from typing import Any, Callable, Mapping

import chex
from flax import traverse_util
import jax
import jax.numpy as jnp
import optax

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import kernels
from realcustom_jax import mask as mask_lib
from realcustom_jax import scoring as scoring_lib
from realcustom_jax import encoders
from realcustom_jax.runtime import sharding
from realcustom_jax.loading import weights
from realcustom_jax import model as model_lib
from realcustom_jax import schedules
from realcustom_jax.model import RealCustom

Array = jax.Array
State = dict[str, Any]  # {'step', 'params' (adapter), 'opt_state', 'rng'}



class ConfigError(ValueError):
  """A user mistake in the config; train/main.py prints it as one line, exit status 2."""


# ---------------------------------------------------------------------------------
# Models and step settings
# ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Models:
  """The modules (no parameters) and static settings the step closes over."""
  model: RealCustom
  vae: Any  # diffusers FlaxAutoencoderKL
  text_encoder: Any  # clip.CLIPTextModel
  vision_model: Any  # clip.CLIPVisionModel
  scaling_factor: float
  vision_resize: int
  vision_size: int
  vision_mean: tuple[float, float, float]
  vision_std: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Training hyper-parameters of one step (static under jit)."""
  alphas_cumprod: tuple[float, ...]
  prediction_type: str = 'epsilon'
  gamma_num_range: tuple[float, float] = (0.3, 1.0)
  image_dropout: float = 0.1
  # 'none' (the paper: Eq. 10's top-k has no gradient) or 'straight_through'.
  selection_gradient: str = 'none'
  # 'none' (the paper: the score nets learn through Eq. 9's gain only) or 'word_map':
  # also a loss pulling the fused scores towards the base's own cross-attention map of
  # the caption's subject word (`score_supervision_loss`), with this weight.
  score_supervision: str = 'none'
  score_supervision_weight: float = 0.1
  subject_word_ids: tuple[int, ...] = ()  # the token ids of config.train.subject_words


SELECTION_GRADIENTS = ('none', 'straight_through')
SCORE_SUPERVISIONS = ('none', 'word_map')


def build_step_config(config, scheduler_config: Mapping[str, Any],
                      tokenizer=None) -> StepConfig:
  """The step's hyper-parameters: the noise schedule of `scheduler_config` (the
  sampler's own) and `config.train`'s gamma_num range, image dropout and score
  supervision (its subject words become token ids through `tokenizer`).

  Raises:
    ConfigError: a scheduler config the noise schedule cannot be built from, or a
      subject word that is not one token.
  """
  try:
    abar = schedules.alphas_cumprod(scheduler_config)  # one schedule for both
  except ValueError as e:
    raise ConfigError(str(e)) from None
  supervision = str(config.train.get('score_supervision', 'none'))
  word_ids = ()
  if supervision != 'none':
    word_ids = subject_word_ids(tokenizer, config.train.get('subject_words', ()))
  return StepConfig(
      alphas_cumprod=tuple(float(a) for a in abar),
      prediction_type=scheduler_config.get('prediction_type', 'epsilon'),
      gamma_num_range=tuple(float(x) for x in config.train.gamma_num_range),
      image_dropout=float(config.train.image_dropout),
      selection_gradient=str(config.train.get('selection_gradient', 'none')),
      score_supervision=supervision,
      score_supervision_weight=float(config.train.get('score_supervision_weight', 0.1)),
      subject_word_ids=word_ids)


def subject_word_ids(tokenizer, words) -> tuple[int, ...]:
  """The token id of each subject word (config.train.subject_words).

  Raises:
    ConfigError: no tokenizer, or a word the tokenizer splits into several tokens
      (its map would be one piece's).
  """
  if tokenizer is None:
    raise ConfigError('config.train.score_supervision needs the text tokenizer')
  ids = []
  for word in words:
    pieces = tokenizer(str(word), add_special_tokens=False).input_ids
    if len(pieces) != 1:
      raise ConfigError(f'config.train.subject_words: {word!r} is {len(pieces)} tokens for '
                        'this tokenizer; each subject word must be exactly one')
    ids.append(int(pieces[0]))
  return tuple(ids)


def build_models(config, sd: weights.StableDiffusionComponents,
                 vision: weights.VisionEncoder) -> tuple[Models, StepConfig]:
  """The step's modules and hyper-parameters from the config and the frozen components.

  Raises:
    ConfigError: a scheduler config the noise schedule cannot be built from.
  """
  step_config = build_step_config(config, sd.scheduler_config, sd.tokenizer)
  models = Models(
      model=model_lib.build_model(config, sd.unet_config), vae=sd.vae, text_encoder=sd.text_encoder,
      vision_model=vision.model, scaling_factor=float(sd.scaling_factor),
      vision_resize=int(vision.resize_size), vision_size=int(vision.image_size),
      vision_mean=tuple(vision.mean), vision_std=tuple(vision.std))
  return models, step_config


def cast_floating(tree: Any, dtype) -> Any:
  """Casts the floating-point leaves of `tree` to `dtype`; integer leaves stay."""
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def feature_shapes(sd: weights.StableDiffusionComponents, vision: weights.VisionEncoder,
                   resolution: int) -> dict[str, tuple[int, ...]]:
  """Per-sample shapes of what the UNet sees: latents, text and image features."""
  if resolution % sd.vae_scale_factor:
    raise ConfigError(f'config.resolution={resolution} is not a multiple of the VAE '
                      f'factor {sd.vae_scale_factor}')
  side = resolution // sd.vae_scale_factor
  return dict(latents=(sd.unet_config.get('in_channels', 4), side, side),
              text=(sd.tokenizer.model_max_length,
                    sd.unet_config.get('cross_attention_dim', 1280)),
              image=(vision.num_patches, vision.hidden_size))


# ---------------------------------------------------------------------------------
# Train state
# ---------------------------------------------------------------------------------


def create_optimizer(config) -> optax.GradientTransformation:
  """AdamW over the adapter tree only (the caller never passes frozen params)."""
  t = config.train
  lr = t.learning_rate
  if t.get('warmup_steps', 0):
    lr = optax.linear_schedule(0.0, t.learning_rate, int(t.warmup_steps))
  chain = []
  if t.get('grad_clip_norm', 0.0):
    chain.append(optax.clip_by_global_norm(float(t.grad_clip_norm)))
  chain.append(optax.adamw(lr, b1=t.get('adam_b1', 0.9), b2=t.get('adam_b2', 0.999),
                           weight_decay=t.weight_decay))
  return optax.chain(*chain)


def init_adapter(model: RealCustom, unet_params: Mapping, rng: Array,
                 shapes: Mapping[str, tuple[int, ...]],
                 visual_kv_init: str = 'zero_v') -> dict:
  """Random adapter, visual K/V started from the text K/V (`adapter.init_visual_kv`:
  'zero_v' zeroes to_v_visual, 'copy_text' is IP-Adapter's copy).

  Only the adapter is materialised: the jitted init returns the adapter subtree, so XLA
  drops the random UNet it would otherwise build.

  Raises:
    ConfigError: the pretrained UNet's parameter tree differs from the model's.
  """
  sizes = (shapes['latents'], shapes['text'][0]) + tuple(shapes['image'])
  abstract_base, _ = adapter_lib.split_params(model_lib.param_shapes(model, *sizes))
  expected = jax.tree.map(lambda x: x.shape, abstract_base['unet'])
  got = jax.tree.map(lambda x: tuple(x.shape), dict(unet_params))
  if expected != got:
    raise ConfigError('the pretrained UNet parameters do not match the UNet built from its '
                      'config (different tree or shapes)')
  adapter = model_lib.init_adapter_params(model, rng, *sizes)
  full = adapter_lib.init_visual_kv(
      adapter_lib.merge_params({'unet': unet_params}, adapter), visual_kv_init)
  # The adapter trains in float32 even when the frozen text K/V it copies are bf16.
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                      adapter_lib.split_params(full)[1])


def create_train_state(adapter: dict, optimizer: optax.GradientTransformation,
                       rng: Array) -> State:
  """Step 0: the adapter, its freshly initialised optimizer state and the step rng."""
  return {'step': jnp.zeros((), jnp.int32), 'params': adapter,
          'opt_state': optimizer.init(adapter), 'rng': rng}


def state_shardings(state: State, mesh) -> State:
  """Adapter params and optimizer state by the fsdp rule; step and rng replicated."""
  return {'step': sharding.replicated(mesh),
          'params': sharding.param_shardings(state['params'], mesh),
          'opt_state': sharding.param_shardings(state['opt_state'], mesh),
          'rng': sharding.replicated(mesh)}


# ---------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------


def vision_pixels(images: Array, models: Models) -> Array:
  """CLIP preprocessing in jax: [-1, 1] NHWC -> resize, centre crop, normalise, NCHW."""
  b, h, w, _ = images.shape
  r = models.vision_resize
  new_h, new_w = (r, max(r, w * r // h)) if h <= w else (max(r, h * r // w), r)
  x = jax.image.resize(images.astype(jnp.float32), (b, new_h, new_w, 3), 'bicubic')
  s = models.vision_size
  top, left = (new_h - s) // 2, (new_w - s) // 2
  x = x[:, top:top + s, left:left + s]
  x = ((x + 1.0) / 2.0 - jnp.asarray(models.vision_mean)) / jnp.asarray(models.vision_std)
  return jnp.transpose(x, (0, 3, 1, 2))


def encode_features(frozen: Mapping, batch: Mapping[str, Array],
                    models: Models) -> dict[str, Array]:
  """The frozen encoders' deterministic outputs for a batch of images and captions.

  What precomputation stores (train/precompute.py): the VAE posterior's moments rather
  than one draw from it, so every step still draws its own z_0 (`sample_latents`).

  The subject features come from `batch['reference']` when the batch has one (a set
  prepared with references, `config.data.subject_reference='stored'`), else from the
  training image itself (the paper).

  Returns:
    {'latent_mean', 'latent_std': (B, h, w, c) NHWC as the VAE gives them, unscaled;
     'text': (B, L, c_t) f_ct; 'image': (B, n, c_i) f_ci}, in the encoders' dtype.
  """
  images = batch['image'].astype(jnp.float32)
  subjects = batch.get('reference', images).astype(jnp.float32)
  posterior = models.vae.apply({'params': frozen['vae']}, jnp.transpose(images, (0, 3, 1, 2)),
                               method=models.vae.encode).latent_dist
  return {'latent_mean': posterior.mean, 'latent_std': posterior.std,
          'text': encoders.encode_text(models.text_encoder, frozen['text'], batch['input_ids']),
          'image': encoders.image_features(models.vision_model, frozen['vision'],
                                           vision_pixels(subjects, models))}


def sample_latents(mean: Array, std: Array, rng: Array, scaling_factor: float) -> Array:
  """z_0 = scaling_factor * (mean + std * eps), NCHW; eps drawn as diffusers'
  `FlaxDiagonalGaussianDistribution.sample` draws it (NHWC), so a stored posterior and
  the live one give the same z_0 for the same rng."""
  mean, std = mean.astype(jnp.float32), std.astype(jnp.float32)
  z = mean + std * jax.random.normal(rng, mean.shape, jnp.float32)
  return jnp.transpose(z, (0, 3, 1, 2)) * scaling_factor


def token_grid_targets(word_map: Array, num_tokens: int) -> Array:
  """A (B, H, W) word map as a distribution over the subject encoder's patch tokens.

  The tokens are a row-major g x g grid over the same image (the training image is its
  own subject, config.data.subject_reference='self'), so the map is averaged over each
  token's block of cells (resized when the sizes do not divide) and normalised; a row
  without mass is uniform.
  """
  side = int(round(num_tokens ** 0.5))
  if side * side != num_tokens:
    raise ValueError(f'score supervision needs a square grid of patch tokens, got {num_tokens}')
  b, height, width = word_map.shape
  word_map = word_map.astype(jnp.float32)
  if height % side == 0 and width % side == 0:  # each token's block of map cells
    grid = word_map.reshape(b, side, height // side, side, width // side).mean(axis=(2, 4))
  else:
    grid = jax.image.resize(word_map, (b, side, side), 'linear', antialias=True)
  grid = grid.reshape(b, num_tokens)
  grid = jnp.maximum(grid, 0.0)
  total = jnp.sum(grid, axis=-1, keepdims=True)
  return jnp.where(total > 0, grid / jnp.where(total > 0, total, 1.0), 1.0 / num_tokens)


def score_supervision_loss(intermediates: Mapping, rows: Array) -> Array:
  """Cross-entropy from the subject word's map to the softmax of the fused scores.

  Our option, not the paper's (config.train.score_supervision='word_map'): the paper's
  score nets learn only through Eq. 9's gain, which in the toy world teaches them no
  more subject than chance (docs/toy_reproduction.md). Here they also learn to rank
  the tokens as the frozen base's own cross-attention ranks the subject word's region
  on z_t (Eq. 11's maps, averaged over layers, at training): label-free, given which
  caption words name subjects. The target has no gradient; the loss reaches only the
  score nets and their pooling.

  Args:
    intermediates: the 'intermediates' collection of a forward pass with
      `word_weights` on the subject words: every attn2's 'word_map' and the scoring
      module's fused scores.
    rows: (B,) float weight per row (0 for rows without the subject or its word).

  Returns:
    scalar: the rows' mean cross-entropy (0 when no row counts).
  """
  flat = traverse_util.flatten_dict(dict(intermediates))
  maps = [v[0] for k, v in flat.items() if k[-1] == 'word_map']
  fused = [v[0] for k, v in flat.items() if k[-1] == scoring_lib.FUSED_SCORES]
  if len(fused) != 1 or not maps:
    raise ValueError('score supervision needs the word maps and one scoring module, got '
                     f'{len(maps)} maps and {len(fused)} fused scores')
  fused = fused[0].astype(jnp.float32)
  targets = jax.lax.stop_gradient(
      token_grid_targets(mask_lib.aggregate_word_maps(maps), fused.shape[-1]))
  per_row = -jnp.sum(targets * jax.nn.log_softmax(fused, axis=-1), axis=-1)
  return jnp.sum(per_row * rows) / jnp.maximum(jnp.sum(rows), 1.0)


def adapter_step(state: State, unet_params: Mapping, latents: Array, text: Array,
                 image: model_lib.ImageFeatures, rng: Array, *, models: Models,
                 step_config: StepConfig, optimizer: optax.GradientTransformation,
                 added_cond: Mapping[str, Array] | None = None,
                 subject_words: Array | None = None) -> tuple[State, dict]:
  """One AdamW update of the adapter on encoded inputs (Eqs. 1, 2, 10).

  Split from `train_step` so benchmarks can time it on pre-computed features, and so
  the release's trainer (`realcustom_jax.release.training`) runs the same update: its
  `image` is the subject encoder's (global, local) pair and `added_cond` SDXL's
  {'text_embeds', 'time_ids'}. `models` needs only `.model`. `subject_words`: (B, L)
  1 at the caption's subject words, for the score supervision (`score_supervision_loss`).
  """
  images = list(image) if isinstance(image, (tuple, list)) else [image]
  chex.assert_rank([latents, text, *images], [4, 3] + [3] * len(images))
  chex.assert_equal_shape_prefix([latents, text, *images], 1)
  b = latents.shape[0]
  t_rng, n_rng, g_rng, d_rng = jax.random.split(rng, 4)
  abar_table = jnp.asarray(step_config.alphas_cumprod, jnp.float32)
  t = jax.random.randint(t_rng, (b,), 0, abar_table.shape[0])
  noise = jax.random.normal(n_rng, latents.shape, jnp.float32)
  abar = abar_table[t]
  sqrt_ab = jnp.sqrt(abar)[:, None, None, None]
  sqrt_1mab = jnp.sqrt(1.0 - abar)[:, None, None, None]
  z_t = sqrt_ab * latents + sqrt_1mab * noise  # Eq. 2
  target = {'epsilon': noise, 'v_prediction': sqrt_ab * noise - sqrt_1mab * latents,
            'sample': latents}[step_config.prediction_type]
  low, high = step_config.gamma_num_range
  gamma_num = jax.random.uniform(g_rng, (b,), minval=low, maxval=high)  # Eq. 10
  image_keep = jax.random.uniform(d_rng, (b,)) >= step_config.image_dropout
  base = {'unet': unet_params}
  straight_through = {}
  if step_config.selection_gradient == 'straight_through':
    straight_through = {'straight_through_selection': True}

  supervised = step_config.score_supervision != 'none'
  if supervised and subject_words is None:
    raise ValueError('config.train.score_supervision needs the captions\' subject words '
                     '(train_step; precomputed features have no captions)')

  def loss_fn(adapter):
    variables = {'params': adapter_lib.merge_params(base, adapter)}
    kwargs = dict(sqrt_alpha_bar=jnp.sqrt(abar), gamma_num=gamma_num, image_keep=image_keep,
                  added_cond=added_cond, **straight_through)
    if not supervised:
      pred = models.model.apply(variables, z_t, t, text, image, **kwargs)
      return jnp.mean(jnp.square(pred.astype(jnp.float32) - target)), {}  # Eq. 1
    pred, sown = models.model.apply(variables, z_t, t, text, image, word_weights=subject_words,
                                    mutable=['intermediates'], **kwargs)
    rows = (image_keep & jnp.any(subject_words > 0, axis=-1)).astype(jnp.float32)
    score_loss = score_supervision_loss(sown['intermediates'], rows)
    diffusion = jnp.mean(jnp.square(pred.astype(jnp.float32) - target))  # Eq. 1
    return (diffusion + step_config.score_supervision_weight * score_loss,
            {'diffusion_loss': diffusion, 'score_loss': score_loss})

  (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  new_state = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state,
               'rng': state['rng']}
  metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads),
             'param_norm': optax.global_norm(params), **extra}
  return new_state, metrics


def train_step(state: State, frozen: Mapping, batch: Mapping[str, Array], *,
               models: Models, step_config: StepConfig,
               optimizer: optax.GradientTransformation) -> tuple[State, dict]:
  """Encode with the frozen models, then update the adapter; one jit around both.

  The step on precomputed features (`precomputed_train_step`) run on what the encoders
  give here, so the two draw the same randomness by construction.
  """
  features = jax.lax.stop_gradient(encode_features(frozen, batch, models))
  if step_config.score_supervision != 'none':
    features['subject_words'] = jnp.isin(
        batch['input_ids'], jnp.asarray(step_config.subject_word_ids, jnp.int32)
    ).astype(jnp.float32)
  return precomputed_train_step(state, frozen, features, models=models,
                                step_config=step_config, optimizer=optimizer)


def precomputed_train_step(state: State, frozen: Mapping, batch: Mapping[str, Array], *,
                           models: Models, step_config: StepConfig,
                           optimizer: optax.GradientTransformation) -> tuple[State, dict]:
  """`train_step` on features the encoders computed beforehand (no encoder runs).

  `batch` holds `encode_features`' outputs (any float dtype); `frozen` needs only
  'unet'. The randomness of step s is fold_in(rng, s): a resumed run draws what an
  uninterrupted one would; its first half draws z_0 from the stored posterior, the
  second eps, t, gamma_num and dropout (`adapter_step`).
  """
  rng = jax.random.fold_in(state['rng'], state['step'])
  enc_rng, step_rng = jax.random.split(rng)
  latents = sample_latents(batch['latent_mean'], batch['latent_std'], enc_rng,
                           models.scaling_factor)
  return adapter_step(state, frozen['unet'], latents, batch['text'].astype(jnp.float32),
                      batch['image'].astype(jnp.float32), step_rng, models=models,
                      step_config=step_config, optimizer=optimizer,
                      subject_words=batch.get('subject_words'))


@dataclasses.dataclass
class TrainSetup:
  """Everything the adapter step needs, built once; the train loop and the train-step
  benchmark both run their steps from it.

  Attributes:
    models: the modules the step closes over.
    step_config: the step's hyper-parameters.
    optimizer: AdamW over the adapter tree.
    state: the train state ({'step', 'params', 'opt_state', 'rng'}), placed on `mesh`.
    frozen: the frozen trees ({'unet', 'vae', 'text', 'vision'}; only 'unet' with
      precomputed features and in the train-step benchmark), placed on `mesh`.
    state_sharding: the state's shardings.
    frozen_sharding: the frozen trees' shardings.
    mesh: the device mesh.
    step_fn: the step with the frozen encoders, `(state, frozen, batch, *, models,
      step_config, optimizer)`; default `train_step` (the release's trainer passes its
      own, `realcustom_jax.release.training`).
    precomputed_step_fn: the step on precomputed features; default
      `precomputed_train_step`.
    precomputed_frozen: the frozen trees the precomputed step reads.
  """
  models: Any  # Models, or the release trainer's ReleaseModels
  step_config: Any  # StepConfig, or the release trainer's ReleaseStepConfig
  optimizer: optax.GradientTransformation
  state: State
  frozen: dict
  state_sharding: State
  frozen_sharding: dict
  mesh: Any
  step_fn: Callable[..., tuple[State, dict]] | None = None
  precomputed_step_fn: Callable[..., tuple[State, dict]] | None = None
  precomputed_frozen: tuple[str, ...] = ('unet',)

  def batch_sharding(self, batch: Mapping[str, Any]) -> dict:
    """Each batch entry split along the mesh's batch axes."""
    return sharding.batch_shardings(batch, self.mesh)

  def train_step(self, batch: Mapping[str, Any], precomputed: bool = False):
    """The sharded, donated step: ONE jax.jit with in/out shardings, taking (state,
    frozen, batch) shaped like `batch`; with the frozen encoders (`train_step`), or on
    precomputed features (`precomputed_train_step`, whose frozen tree is {'unet'})."""
    if precomputed:
      step = self.precomputed_step_fn or precomputed_train_step
    else:
      step = self.step_fn or train_step
    fn = functools.partial(step, models=self.models, step_config=self.step_config,
                           optimizer=self.optimizer)
    frozen_sharding = self.frozen_sharding
    if precomputed:
      frozen_sharding = {k: frozen_sharding[k] for k in self.precomputed_frozen}
    return jax.jit(self._in_mesh(fn), in_shardings=(self.state_sharding, frozen_sharding,
                                     self.batch_sharding(batch)),
                   out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
                   donate_argnums=(0,))

  def adapter_step(self):
    """The donated step on encoded inputs: (state, unet_params, latents, text, image),
    the randomness of step s being fold_in(rng, s) as in `train_step`."""
    def step(state, unet_params, latents, text, image):  # XLA module 'jit_step'
      rng = jax.random.fold_in(state['rng'], state['step'])
      return adapter_step(state, unet_params, latents, text, image, rng,
                          models=self.models, step_config=self.step_config,
                          optimizer=self.optimizer)
    return jax.jit(self._in_mesh(step), donate_argnums=(0,))

  def _in_mesh(self, fn):
    """`fn` traced under the mesh, so that kernels XLA cannot partition run per device
    over the batch axes (`kernels.per_batch_shard`)."""
    def traced_in_mesh(*args):
      with kernels.batch_mesh(self.mesh):
        return fn(*args)
    # The XLA module keeps the step's name ('jit_step', 'jit_train_step', ...).
    traced_in_mesh.__name__ = getattr(fn, '__name__', None) or fn.func.__name__
    return traced_in_mesh


def place_train_setup(config, mesh, models: Models, step_config: StepConfig, adapter: dict,
                      frozen: dict, **step_fns) -> TrainSetup:
  """Creates the optimizer and the train state and places both trees on `mesh`.

  Args:
    config: reads `config.seed` and `config.train` (optimizer, `frozen_dtype`).
    mesh: the device mesh.
    models: the step's modules.
    step_config: the step's hyper-parameters.
    adapter: the initial adapter tree (float32).
    frozen: the frozen trees, cast here to `config.train.frozen_dtype`.
    **step_fns: TrainSetup's `step_fn`, `precomputed_step_fn`, `precomputed_frozen`
      (the release's trainer); default the paper's steps.

  Returns:
    The TrainSetup.
  """
  optimizer = create_optimizer(config)
  frozen = cast_floating(frozen, model_lib.DTYPES[config.train.get('frozen_dtype', 'float32')])
  frozen_sh = sharding.param_shardings(frozen, mesh)
  frozen = sharding.device_put_tree(frozen, frozen_sh)
  train_rng = jax.random.split(jax.random.PRNGKey(config.seed))[1]
  state = create_train_state(adapter, optimizer, train_rng)
  state_sh = state_shardings(state, mesh)
  state = sharding.device_put_tree(state, state_sh)
  return TrainSetup(models, step_config, optimizer, state, frozen, state_sh, frozen_sh, mesh,
                    **step_fns)


def setup_training(config, mesh, sd: weights.StableDiffusionComponents,
                   vision: weights.VisionEncoder, *,
                   with_encoders: bool = True) -> tuple[TrainSetup, dict]:
  """Builds everything the step needs from the frozen components, placed on `mesh`.

  Args:
    config: the experiment config.
    mesh: the device mesh.
    sd: the frozen Stable Diffusion components.
    vision: the frozen CLIP vision encoder.
    with_encoders: False places only the UNet (training on precomputed features), which
      frees the VAE's and CLIP's device memory.

  Returns:
    (TrainSetup, feature shapes from `feature_shapes`).
  """
  models, step_config = build_models(config, sd, vision)
  shapes = feature_shapes(sd, vision, config.resolution)
  # Adapter first: its visual K/V start from the full-precision text K/V.
  init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
  adapter = init_adapter(models.model, sd.unet_params, init_rng, shapes,
                         config.train.get('visual_kv_init', 'zero_v'))
  frozen = {'unet': sd.unet_params}
  if with_encoders:
    frozen.update(vae=sd.vae_params, text=sd.text_params, vision=vision.params)
  return place_train_setup(config, mesh, models, step_config, adapter, frozen), shapes
