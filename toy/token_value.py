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
share, per timestep and overall.
"""
import json
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from toy import selection_gate

FLAGS = flags.FLAGS


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
  from realcustom_jax import schedules  # pylint: disable=g-import-not-at-top
  from toy import base as toy_base  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  rendered = [toy_world.render(sc, image_size) for sc in scenes]
  images = np.stack([r[0] for r in rendered])
  c = pipe.components
  z0 = jnp.asarray(toy_base.encode_latents(c.vae, c.vae_params, images) * c.scaling_factor)
  cond = pipe.encode([Image.fromarray(i) for i in images], [sc.caption for sc in scenes],
                     [sc.shape for sc in scenes])
  n = cond.image.shape[1]
  areas = selection_gate.token_object_area(np.stack([r[1] for r in rendered]), n)
  abar = schedules.alphas_cumprod(c.scheduler_config)
  b = len(scenes)

  @jax.jit
  def loss(z_t, t, noise, sqrt_ab, gamma_num, priority):
    eps = pipe.model.apply({'params': pipe.params}, z_t, jnp.full((b,), t), cond.text,
                           cond.image, sqrt_alpha_bar=jnp.full((b,), sqrt_ab),
                           gamma_num=gamma_num, token_priority=priority)
    return jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))

  key = jax.random.PRNGKey(seed)
  all_values, out = [], {'by_t': {}}
  for t in timesteps:
    noise = jax.random.normal(jax.random.fold_in(key, t), z0.shape)
    sqrt_ab = float(np.sqrt(abar[t]))
    z_t = sqrt_ab * z0 + float(np.sqrt(1.0 - abar[t])) * noise
    keep_all = loss(z_t, t, noise, sqrt_ab, 1.0, jnp.ones((b, n)))
    values = np.zeros((b, n))
    for j in range(n):
      priority = jnp.ones((b, n)).at[:, j].set(0.0)  # token j last: the one dropped
      values[:, j] = np.asarray(loss(z_t, t, noise, sqrt_ab, (n - 1) / n, priority)
                                - keep_all)
    all_values.append(values)
    out['by_t'][int(t)] = _summary(values, areas)
  out.update(_summary(np.concatenate(all_values), np.concatenate([areas] * len(timesteps))))
  out.update(tokens=int(n), scenes=int(b))
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
  print(json.dumps({'benchmark': 'toy_token_value', 'adapter': FLAGS.adapter,
                    **token_values(pipe, scenes, int(config.resolution))}))


if __name__ == '__main__':
  flags.DEFINE_string('sd', None, 'The base model directory (diffusers SD layout).')
  flags.DEFINE_string('vision', None, 'The subject encoder directory the adapter reads.')
  flags.DEFINE_string('adapter', None, 'A scored adapter file (train.export).')
  flags.DEFINE_integer('scenes', 32, 'Training-world scenes measured.')
  flags.mark_flags_as_required(['sd', 'vision', 'adapter'])
  app.run(main)
