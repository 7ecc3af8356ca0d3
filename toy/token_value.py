"""Does the training loss reward keeping the subject's tokens? (issue 27, cause 2)

The score nets can only learn to rank the subject's tokens first if the loss they are
trained on cares which tokens Eq. 10 keeps. This measures that directly, inference
only, on a trained adapter: for training-world scenes used as in adapter training (the
image is its own subject; caption with the real word only; no scope), the denoising
loss with every subject token kept, and with each token dropped alone (Eq. 10's
selection forced by `token_priority` at gamma_num (n - 1) / n). A token's *value* is
how much the loss rises when it alone is dropped. If object tokens are worth more than
background tokens, the objective holds a signal the score nets could follow; if not,
the selection has nothing to learn from this loss.

  python -m toy.token_value --sd=DIR/shipped_base/sd --vision=DIR/shipped_base/vision \
      --adapter=DIR/adapter_adaptive/seed0/adapter.safetensors [--encoder_vision=...]

prints one JSON line: the mean value of object tokens (object share > 0.5) and of
background tokens (share 0), their ratio and the correlation between value and object
share, per timestep and overall; and `selection_shift`: the learned selection's precision
on these scenes as training feeds the score nets and as inference does. With --fit_scenes=N it also fits the score nets to
those values on N other scenes (`fit_scoring`) and samples the reproduction's held-out
cases with the learned and with the fitted score nets: can the score nets, given the
loss's own signal directly, choose the subject's tokens?
"""
import functools
import json
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from toy import selection_gate

FLAGS = flags.FLAGS


@functools.partial(jax.jit, static_argnums=0)
def _denoising_loss(model, params, text, image, z_t, t, noise, sqrt_ab, gamma_num, priority):
  """Per-sample noise-prediction loss with Eq. 10 following `priority` (one program per
  model and batch shape, whatever the scenes)."""
  b = z_t.shape[0]
  eps = model.apply({'params': params}, z_t, jnp.full((b,), t), text, image,
                    sqrt_alpha_bar=jnp.full((b,), sqrt_ab), gamma_num=gamma_num,
                    token_priority=priority)
  return jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))


def _apply_scoring(model, params, scoring_params, *args):
  """Eqs. 5-10 alone: the model's own scoring module (built by `RealCustom.setup`) with
  `scoring_params` in place of the adapter's."""
  return model.apply({'params': dict(params, scoring=scoring_params)}, *args,
                     method=lambda m, *a: m.scoring(*a))


def _measure(pipe, scenes, image_size: int, timesteps, seed: int, values: bool = True):
  """Yields, per timestep: (t, conditions, z_t, sqrt(abar_t), (B, n) token values (None
  with values=False), (B, n) object shares)."""
  from realcustom_jax import schedules  # pylint: disable=g-import-not-at-top
  from toy import base as toy_base  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  rendered = [toy_world.render(sc, image_size) for sc in scenes]
  images = np.stack([r[0] for r in rendered])
  c = pipe.components
  z0 = jnp.asarray(toy_base.encode_latents(c.vae, c.vae_params, images) * c.scaling_factor)
  cond = pipe.encode([Image.fromarray(i) for i in images], [sc.caption for sc in scenes],
                     [sc.shape for sc in scenes])
  n, b = cond.image.shape[1], len(scenes)
  areas = selection_gate.token_object_area(np.stack([r[1] for r in rendered]), n)
  abar = schedules.alphas_cumprod(c.scheduler_config)
  loss = functools.partial(_denoising_loss, pipe.model, pipe.params, cond.text, cond.image)
  key = jax.random.PRNGKey(seed)
  for t in timesteps:
    noise = jax.random.normal(jax.random.fold_in(key, t), z0.shape)
    sqrt_ab = float(np.sqrt(abar[t]))
    z_t = sqrt_ab * z0 + float(np.sqrt(1.0 - abar[t])) * noise
    if not values:
      yield t, cond, z_t, sqrt_ab, None, areas
      continue
    keep_all = loss(z_t, t, noise, sqrt_ab, 1.0, jnp.ones((b, n)))
    token_value = np.zeros((b, n))
    for j in range(n):
      priority = jnp.ones((b, n)).at[:, j].set(0.0)  # token j last: the one dropped
      token_value[:, j] = np.asarray(loss(z_t, t, noise, sqrt_ab, (n - 1) / n, priority)
                                     - keep_all)
    yield t, cond, z_t, sqrt_ab, token_value, areas


def token_values(pipe, scenes, image_size: int, timesteps=(100, 400, 700),
                 seed: int = 0) -> dict:
  """The loss rise per dropped token, against each token's object share.

  Args:
    pipe: a `RealCustomPipeline` with a scored adapter (its model takes a priority).
    scenes: `toy.world.Scene`s; each image is its own subject, as in adapter training.
    image_size: the world's image side.
    timesteps: the noise levels measured.
    seed: the noise draw.

  Returns:
    {'by_t': {t: {'object', 'background', 'ratio', 'correlation'}}, and the same keys
     over all timesteps; 'tokens', 'scenes'}.
  """
  all_values, all_areas, out = [], [], {'by_t': {}}
  for t, _, _, _, values, areas in _measure(pipe, scenes, image_size, timesteps, seed):
    all_values.append(values)
    all_areas.append(areas)
    out['by_t'][int(t)] = _summary(values, areas)
  out.update(_summary(np.concatenate(all_values), np.concatenate(all_areas)))
  out.update(tokens=int(all_values[0].shape[1]), scenes=len(scenes))
  return out


def fit_scoring(pipe, scenes, image_size: int, timesteps=(100, 400, 700), batch: int = 32,
                steps: int = 300, lr: float = 3e-3, seed: int = 0) -> dict:
  """The score nets (the adapter's 'scoring' subtree, same module and inputs) fitted to
  rank the tokens by their measured value (ListNet: softmax cross-entropy between the
  fused scores and the standardised values), everything else frozen.

  A diagnostic, not a recipe: can the score nets represent "which tokens the loss
  needs" when they are given that signal directly? Returns the fitted parameters.
  """
  import optax  # pylint: disable=g-import-not-at-top
  data = []
  for start in range(0, len(scenes), batch):
    for t, cond, z_t, sqrt_ab, values, _ in _measure(pipe, scenes[start:start + batch],
                                                       image_size, timesteps, seed + start):
      v = (values - values.mean(1, keepdims=True)) / (values.std(1, keepdims=True) + 1e-12)
      data.append((cond.text, z_t, jnp.full((z_t.shape[0],), sqrt_ab), cond.image,
                   jnp.asarray(v)))

  def loss_fn(params):
    total = 0.0
    for text, z_t, sqrt_ab, image, target in data:
      out = _apply_scoring(pipe.model, pipe.params, params, text, z_t, sqrt_ab, image, 1.0)
      log_p = jnp.log(out.scores + 1e-30)  # softmax scores: log_softmax of the fused
      total += optax.softmax_cross_entropy(log_p, jax.nn.softmax(3.0 * target)).mean()
    return total / len(data)

  params = pipe.params['scoring']
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  for i in range(steps):
    params, state, value = step(params, state)
    if i % 100 == 0 or i == steps - 1:
      logging.info('fit_scoring step %d loss %.4f', i, float(value))
  return params


def selection_on_eval_cases(pipe, params, config, seeds=(0, 1)) -> dict:
  """Samples the reproduction's held-out cases at the paper's settings with `params`;
  identity, similarity, text control and selection precision (`selection_gate`)."""
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  from toy import metrics as toy_metrics  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  res = int(config.resolution)
  cases = toy_world.eval_cases(res, int(config.toy.prompts_per_subject))
  rendered = [toy_world.render(c.subject, res) for c in cases]
  refs = [r[0] for r in rendered]
  cond = pipe.encode([Image.fromarray(r) for r in refs], [c.prompt for c in cases],
                     [c.word for c in cases])
  areas = selection_gate.token_object_area(np.stack([r[1] for r in rendered]),
                                           cond.image.shape[1])
  schedule = pipe.schedule(int(config.sampler.num_steps))
  settings = sampler.GuidanceSettings.from_config(config.sampler)
  rows, precision = [], []
  for seed in seeds:
    latents = pipe.initial_latents(seed, len(cases)) * schedule.init_noise_sigma
    out = sampler.sample(pipe.model, params, schedule, latents, cond, settings,
                         return_trajectory=True)
    for img, case, ref in zip(pipe.decode(out.latents), cases, refs):
      rows.append(toy_metrics.score_image(img, case.background, ref, case.subject.identity))
    precision.append(selection_gate.selection_stats(np.asarray(out.selections), areas))
  mean = lambda k: float(np.mean([r[k] for r in rows]))
  return {'identity': mean('id'), 'subject_sim': mean('sim'), 'text_control': mean('text'),
          'selection_precision': float(np.mean([p['precision'] for p in precision])),
          'random_precision': precision[0]['random_precision'],
          'oracle_precision': precision[0]['oracle_precision'], 'n': len(rows)}


def selection_shift(pipe, scenes, image_size: int, timesteps=(400, 700),
                    seed: int = 0) -> dict:
  """Selection precision of the learned scores on training-world scenes, as training
  feeds them (the caption names the reference's own background) and as inference does
  (a prompt asking for another background; z_t masked by the object, as the scope masks
  it), each change alone and both.

  Returns:
    {'<inputs>_t<t>': precision} for inputs in train_like, other_prompt, masked_z, both;
    'random': the object share of a random choice.
  """
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  other = [toy_world.caption(sc.shape, str(rng.choice(
      [c for c in toy_world.COLORS if c not in (sc.body, sc.accent, sc.background)])))
           for sc in scenes]
  rendered = [toy_world.render(sc, image_size) for sc in scenes]
  other_text = pipe.encode([Image.fromarray(r[0]) for r in rendered], other,
                           [sc.shape for sc in scenes]).text
  out, b = {}, len(scenes)
  masks = np.stack([r[1] for r in rendered]).astype(np.float32)
  for t, cond, z_t, sqrt_ab, _, areas in _measure(pipe, scenes, image_size, timesteps, seed,
                                                   values=False):
    h, w = z_t.shape[2:]
    latent_mask = selection_gate.token_object_area(masks, h * w).reshape(b, h, w)
    masked = z_t * jnp.asarray(latent_mask > 0, z_t.dtype)[:, None]
    for name, text, z in (('train_like', cond.text, z_t), ('other_prompt', other_text, z_t),
                          ('masked_z', cond.text, masked), ('both', other_text, masked)):
      kept = _apply_scoring(pipe.model, pipe.params, pipe.params['scoring'], text, z,
                            jnp.full((b,), sqrt_ab), cond.image, 0.8).selected
      out[f'{name}_t{t}'] = selection_gate.selection_stats(np.asarray(kept)[None],
                                                           areas)['precision']
    out['random'] = float(areas.mean())
  return out


def _summary(values: np.ndarray, areas: np.ndarray) -> dict:
  obj = values[areas > 0.5].mean()
  bg = values[areas == 0].mean()
  return {'object': float(obj), 'background': float(bg),
          'ratio': float(obj / bg) if bg != 0 else float('inf'),
          'correlation': float(np.corrcoef(values.ravel(), areas.ravel())[0, 1])}


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  from configs import toy_world as toy_config  # pylint: disable=g-import-not-at-top
  from realcustom_jax.pipeline import RealCustomPipeline  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  config = toy_config.get_config()
  try:
    pipe = RealCustomPipeline.from_pretrained(FLAGS.sd, FLAGS.vision, FLAGS.adapter, config)
  except (OSError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if pipe.model.scoring_mode != 'adaptive':
    print('error: the adapter has no scoring module (nothing is selected)', file=sys.stderr)
    sys.exit(2)
  scenes = list(toy_world.iter_scenes(FLAGS.scenes, int(config.resolution), config.seed + 3))
  result = {'benchmark': 'toy_token_value', 'adapter': FLAGS.adapter,
            **token_values(pipe, scenes, int(config.resolution)),
            'selection_shift': selection_shift(pipe, scenes, int(config.resolution))}
  if FLAGS.fit_scenes:
    fit = list(toy_world.iter_scenes(FLAGS.fit_scenes, int(config.resolution),
                                     config.seed + 4))
    fitted = dict(pipe.params, scoring=fit_scoring(pipe, fit, int(config.resolution)))
    result['learned'] = selection_on_eval_cases(pipe, pipe.params, config)
    result['fitted'] = selection_on_eval_cases(pipe, fitted, config)
  print(json.dumps(result))


if __name__ == '__main__':
  flags.DEFINE_string('sd', None, 'The base model directory (diffusers SD layout).')
  flags.DEFINE_string('vision', None, 'The subject encoder directory the adapter reads.')
  flags.DEFINE_string('adapter', None, 'A scored adapter file (train.export).')
  flags.DEFINE_integer('scenes', 64, 'Training-world scenes measured.')
  flags.DEFINE_integer('fit_scenes', 0, 'With N > 0: also fit the score nets to the '
                       'token values of N other scenes and sample the held-out cases with '
                       'the learned and the fitted score nets (fit_scoring).')
  flags.mark_flags_as_required(['sd', 'vision', 'adapter'])
  app.run(main)
