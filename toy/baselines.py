"""The pseudo-word paradigm on the frozen toy base: Textual Inversion and DreamBooth.

RealCustom's claim (Sec. 1, Fig. 1c, Table 1) is against these: a pseudo-word S* that
represents the subject shares the whole image with the text, so optimising it for
similarity also pulls the rest of the image towards the reference (its background,
here) and costs text control. Both are optimised on ONE reference image of a held-out
subject, with its caption in which the pseudo-word describes the subject:

  "a sks circle on a white background"            (the reference's own background)

and evaluated on prompts that ask for other backgrounds ("a sks circle on a green
background"), after several numbers of steps, so each traces a curve of (text
control, similarity) points:

- Textual Inversion (Gal et al.): only the pseudo-word's token embedding trains (one
  row of the text encoder's embedding table); UNet and text encoder stay frozen.
- DreamBooth (Ruiz et al.): the pseudo-word is a rare token with its embedding as it
  is, and the whole base UNet fine-tunes; no prior-preservation loss (that loss trades
  similarity back for controllability: one more point on the same curve).

The loss is the base model's own (Eqs. 1-2: epsilon MSE at uniform timesteps); the
UNet is the project's (`model.RealCustom` with the visual branch off).
"""
import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from realcustom_jax import encoders
from realcustom_jax import schedules

Array = jax.Array

METHODS = ('textual_inversion', 'dreambooth')


@dataclasses.dataclass(frozen=True)
class BaselineSettings:
  """How one pseudo-word optimisation runs.

  Attributes:
    method: one of METHODS.
    checkpoints: the step counts at which the parameters are kept (each one point of
      the trade-off curve), ascending; the last is the run's length.
    learning_rate: Adam's.
    batch: noised copies of the reference per step (different t and noise).
    seed: of the noise and timesteps.
  """
  method: str
  checkpoints: tuple[int, ...]
  learning_rate: float
  batch: int = 8
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'method must be one of {METHODS}, got {self.method!r}')
    steps = tuple(self.checkpoints)
    if not steps or any(s <= 0 for s in steps) or list(steps) != sorted(set(steps)):
      raise ValueError(f'checkpoints must be positive and ascending, got {steps}')
    if self.batch <= 0 or not self.learning_rate > 0:
      raise ValueError(f'batch and learning_rate must be positive, got {self.batch}, '
                       f'{self.learning_rate}')


def token_id(tokenizer, word: str) -> int:
  """The single token of `word` (the pseudo-word must be one token of the tokenizer)."""
  ids = tokenizer(word, add_special_tokens=False).input_ids
  if len(ids) != 1:
    raise ValueError(f'pseudo-word {word!r} is {len(ids)} tokens of this tokenizer, not one')
  return int(ids[0])


# Where `clip.CLIPTextModel` keeps its token-embedding table.
_EMBEDDING_PATH = ('token_embedding', 'embedding')


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def with_token_embedding(text_params, token: int, vector: Array):
  """`text_params` with row `token` of the token-embedding table replaced by `vector`."""
  table = _get(text_params, _EMBEDDING_PATH)
  return _set(text_params, _EMBEDDING_PATH, table.at[token].set(vector.astype(table.dtype)))


def optimise(settings: BaselineSettings, *, unet_apply: Callable[..., Array], unet_params,
             text_encoder, text_params, tokenizer, latents: Array, caption: str,
             pseudo_word: str, scheduler_config: dict[str, Any]) -> list[tuple[int, Any]]:
  """Runs one pseudo-word optimisation on one reference; returns its checkpoints.

  Args:
    settings: method, checkpoints, learning rate, batch, seed.
    unet_apply: (unet_params, z_t (B, C, h, w), t (B,), text (B, L, c)) -> noise.
    unet_params: the frozen base UNet's parameters (DreamBooth starts from them).
    text_encoder, text_params, tokenizer: the base's text side.
    latents: (C, h, w) the reference image's scaled latents z_0 (one posterior draw or
      its mean).
    caption: the training caption, containing `pseudo_word` once.
    pseudo_word: one token of the tokenizer.
    scheduler_config: the base's noise schedule (Eq. 2).

  Returns:
    [(step, params)] for every checkpoint: the token embedding vector (c,) for
    Textual Inversion, the UNet parameters for DreamBooth.
  """
  token = token_id(tokenizer, pseudo_word)
  ids = jnp.asarray(encoders.tokenize(tokenizer, [caption]))
  abar = jnp.asarray(schedules.alphas_cumprod(scheduler_config))
  z0 = jnp.asarray(latents, jnp.float32)
  step = _step_function(settings.method, unet_apply, text_encoder,
                        float(settings.learning_rate), int(settings.batch))
  if settings.method == 'textual_inversion':
    start = _get(text_params, _EMBEDDING_PATH)[token]
  else:
    start = unet_params
  frozen = (unet_params, text_params, jnp.int32(token))
  state = (start, optax.adam(settings.learning_rate).init(start))
  key = jax.random.PRNGKey(settings.seed)
  out, done = [], 0
  for stop in settings.checkpoints:
    for i in range(done, stop):
      state, _ = step(state, jax.random.fold_in(key, i), z0, ids, abar, frozen)
    done = stop
    out.append((stop, jax.device_get(state[0])))
  return out


@functools.lru_cache(maxsize=8)
def _step_function(method: str, unet_apply: Callable[..., Array], text_encoder,
                   learning_rate: float, batch: int) -> Callable:
  """One jitted optimisation step, shared by every reference (their latents, caption and
  the frozen trees are arguments, so a new subject does not recompile)."""
  opt = optax.adam(learning_rate)

  def noised(key, z0, abar):
    k_t, k_eps = jax.random.split(key)
    t = jax.random.randint(k_t, (batch,), 0, abar.shape[0])
    z0 = jnp.broadcast_to(z0[None], (batch,) + z0.shape)
    eps = jax.random.normal(k_eps, z0.shape)
    a = abar[t][:, None, None, None]
    return jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * eps, t, eps

  def loss_fn(trained, key, z0, ids, abar, frozen):
    unet_params, text_params, token = frozen
    z_t, t, eps = noised(key, z0, abar)
    if method == 'textual_inversion':
      text_params = with_token_embedding(text_params, token, trained)
    else:
      unet_params = trained
    one = encoders.encode_text(text_encoder, text_params, ids)
    pred = unet_apply(unet_params, z_t, t, jnp.broadcast_to(one, (batch,) + one.shape[1:]))
    return jnp.mean(jnp.square(pred - eps))

  @jax.jit
  def step(state, key, z0, ids, abar, frozen):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, key, z0, ids, abar, frozen)
    updates, opt_state = opt.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def prompt_text(text_encoder, text_params, tokenizer, prompts: Sequence[str],
                method: str, token: int, learned) -> np.ndarray:
  """(N, L, c) prompt features with a checkpoint's pseudo-word in place.

  Textual Inversion's checkpoint is the token's embedding; DreamBooth's leaves the text
  side as the base has it (its checkpoint is the UNet).
  """
  if method == 'textual_inversion':
    text_params = with_token_embedding(text_params, token, jnp.asarray(learned))
  ids = jnp.asarray(encoders.tokenize(tokenizer, list(prompts)))
  return np.asarray(encoders.encode_text(text_encoder, text_params, ids))
