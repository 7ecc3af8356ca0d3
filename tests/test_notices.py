"""diffusers' Flax deprecation notice is silenced around the project's own loading and
decoding only: a user's own diffusers Flax class still says it, and the user's logging
levels are untouched. A subprocess: the notice prints once per module build or trace,
which an earlier test in this worker may already have done."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import logging
from configs import tiny
from realcustom_jax.pipelines import load_pipeline
from PIL import Image
config = tiny.get_config()
config.sampler.num_steps = 2
pipe = load_pipeline(config)
pipe([Image.new('RGB', (32, 32), 'red')], ['a toy on the beach'], ['toy'], seed=0)
print('PROJECT DONE', file=sys.stderr, flush=True)
from diffusers import FlaxDDIMScheduler
FlaxDDIMScheduler()  # the user's own Flax class: its notice stays
print('LEVEL', logging.getLogger('diffusers').getEffectiveLevel(), file=sys.stderr)
'''


def test_the_notice_is_silenced_for_the_project_only():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-c', 'import sys\n' + SCRIPT], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  project, user = proc.stderr.split('PROJECT DONE')
  notice = 'Flax classes are deprecated and will be removed in Diffusers'
  assert notice not in project
  assert user.count(notice) == 1
  assert 'LEVEL 30' in user  # diffusers' own default (WARNING), not changed by us
