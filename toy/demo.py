"""`make demo`: a real customization in about a minute, with the shipped toy model.

  python -m toy.demo --out=demo_out                  # held-out subject 0, 4 seeds
  python -m toy.demo --out=demo_out --subject=3 --background=green

Takes one of the toy world's held-out identities (never seen in training) as the
subject, writes its reference image, and samples "a <shape> on a <colour> background"
with the shape as the target word through the real pipeline (`pipelines.load_pipeline`
over the shipped base and adapter, written out in the diffusers layout), beside plain
text-to-image from the same noise. Then reads its own output with the toy metrics:
did the subject's two colours appear (identity), is the asked background the main
colour (text control), where did the influence scope fall.

Writes (upscaled 8x with no smoothing: the world is 16 px): subject.png, realcustom.png,
plain_t2i.png (one column per seed) and mask_grid.png (the scope above x0 over the
steps, Fig. 6).
"""
import os
import sys

from absl import app
from absl import flags
import numpy as np
from PIL import Image

from realcustom_jax.runtime import cli

_OUT = flags.DEFINE_string('out', 'demo_out', 'Directory for the images.')
_SUBJECT = flags.DEFINE_integer('subject', 0, 'Which held-out identity (0-7).')
_BACKGROUND = flags.DEFINE_string('background', None, "The prompt's background colour "
                                  '(default: the first colour unlike the subject).')
_SEEDS = flags.DEFINE_integer('seeds', 4, 'Images to sample (seeds 0..N-1).')
_MODEL_DIR = flags.DEFINE_string('model_dir', None, 'Where to write the shipped model out '
                                 '(default: ~/.cache/realcustom_jax/toy_shipped).')
cli.define_compile_cache_flags()
UPSCALE = 8


def _big(image: np.ndarray) -> Image.Image:
  return Image.fromarray(np.asarray(image, np.uint8)).resize(
      (image.shape[1] * UPSCALE, image.shape[0] * UPSCALE), Image.NEAREST)


def _row(images) -> np.ndarray:
  return np.concatenate(list(images), axis=1)


def choose_case(subject: int, background):
  """(reference scene, background): a held-out identity and a background unlike it."""
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  if not 0 <= subject < len(toy_world.HELD_OUT):
    raise ValueError(f'--subject must lie in [0, {len(toy_world.HELD_OUT) - 1}], got {subject}')
  case = toy_world.eval_cases(16, 1)[subject]
  ref = case.subject
  if background is None:
    return ref, case.background
  if background not in toy_world.COLORS:
    raise ValueError(f'--background must be one of {toy_world.COLORS}, got {background!r}')
  if background in ref.identity + (ref.background,):
    raise ValueError(f'--background={background} is a colour of the subject '
                     f'{ref.identity} or its reference background ({ref.background}): '
                     'the reading could not tell text control from copying')
  return ref, background


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  try:
    ref, background = choose_case(_SUBJECT.value, _BACKGROUND.value)
    if _SEEDS.value < 1:
      raise ValueError(f'--seeds must be at least 1, got {_SEEDS.value}')
    from toy import shipped  # pylint: disable=g-import-not-at-top
    shipped.check()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  cli.quiet_libraries()
  cli.enable_compile_cache()
  from configs import toy_world as toy_config  # pylint: disable=g-import-not-at-top
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  from realcustom_jax import pipeline_common  # pylint: disable=g-import-not-at-top
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  from toy import metrics as toy_metrics  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top

  model_dir = _MODEL_DIR.value or cli.user_cache_dir('toy_shipped')
  sd_dir, vision_dir, adapter = shipped.materialise(model_dir)
  config = toy_config.get_config()
  pipe = pipelines.load_pipeline(config, pretrained=sd_dir, vision_encoder=vision_dir,
                                 adapter=adapter)
  res = int(config.resolution)
  reference = toy_world.render(ref, res)[0]
  prompt = toy_world.caption(ref.shape, background)
  n = _SEEDS.value
  subject = Image.fromarray(reference)
  out = pipe([subject] * n, [prompt] * n, [ref.shape] * n, seed=0, return_masks=True)
  conditions = pipe.encode([subject] * n, [prompt] * n, [ref.shape] * n)
  schedule = pipe.schedule()
  latents = pipe.initial_latents(0, n) * schedule.init_noise_sigma
  plain = pipe.decode(sampler.cfg_sample(pipe.model, pipe.params, schedule, latents,
                                         conditions, pipe.settings()).latents)
  os.makedirs(_OUT.value, exist_ok=True)
  _big(reference).save(os.path.join(_OUT.value, 'subject.png'))
  images = np.stack([np.asarray(im) for im in out.images])
  _big(_row(images)).save(os.path.join(_OUT.value, 'realcustom.png'))
  _big(_row(plain)).save(os.path.join(_OUT.value, 'plain_t2i.png'))
  pipeline_common.save_mask_grid(out, os.path.join(_OUT.value, 'mask_grid.png'))
  scope = np.asarray(out.masks[-1])

  def reading(batch, scopes=None):
    rows = [toy_metrics.score_image(batch[i], background, reference, ref.identity,
                                    None if scopes is None else scopes[i]) for i in range(n)]
    return toy_metrics.summarize(rows)

  rc, t2i = reading(images, scope), reading(plain)
  print(f'subject: a {ref.body} and {ref.accent} {ref.shape} (held-out identity '
        f'{_SUBJECT.value}, reference background {ref.background}); prompt "{prompt}", '
        f'word "{ref.shape}"')
  for name, r in (('realcustom', rc), ('plain T2I', t2i)):
    scope_text = (f', influence scope on the object {r["scope_in_object"]:.2f}'
                  if 'scope_in_object' in r else '')
    print(f'{name:>10}: identity drawn in {round(r["id"] * n)}/{n} images, the asked '
          f'{background} background in {round(r["text"] * n)}/{n}, subject similarity '
          f'{r["sim"]:.2f}{scope_text}')
  print(f'demo: wrote subject.png, realcustom.png, plain_t2i.png and mask_grid.png to '
        f'{_OUT.value}/')


if __name__ == '__main__':
  app.run(main)
