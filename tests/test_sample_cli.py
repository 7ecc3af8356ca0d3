"""`python -m sample.main`: success writes the images; user mistakes exit 2 in one line."""
import os
import subprocess
import sys

from PIL import Image

from realcustom_jax.runtime import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', cli.default_compile_cache_dir())
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  return subprocess.run([sys.executable, '-m', 'sample.main', '--config=configs/tiny.py',
                         *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _assert_one_line_error(proc, *needles):
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ')
  for needle in needles:
    assert needle in last, last


def test_writes_image_and_mask_grid(subject, tmp_path):
  out, grid = tmp_path / 'out.png', tmp_path / 'grid.png'
  proc = _run(f'--subject={subject}', '--prompt=a toy on the beach', '--word=toy',
              f'--out={out}', f'--mask_grid={grid}', '--seed=3',
              '--config.sampler.num_steps=3')
  assert proc.returncode == 0, proc.stderr[-2000:]
  image = Image.open(out)
  assert image.size == (32, 32) and image.mode == 'RGB'
  assert Image.open(grid).size == (3 * 64, 2 * 64)  # 3 steps x (mask, x0)
  assert 'UNTRAINED adapter' in proc.stderr and 'wrote' in proc.stderr


def test_missing_subject(tmp_path):
  proc = _run(f'--subject={tmp_path}/nope.png', '--prompt=a toy', '--word=toy',
              f'--out={tmp_path}/o.png')
  _assert_one_line_error(proc, 'nope.png', 'does not exist')
  assert len(proc.stderr.strip().splitlines()) == 1  # nothing else was printed


def test_word_not_in_prompt(subject, tmp_path):
  proc = _run(f'--subject={subject}', '--prompt=a toy on the beach', '--word=cat',
              f'--out={tmp_path}/o.png')
  _assert_one_line_error(proc, "'cat'", "'a toy on the beach'")
  assert not os.path.exists(tmp_path / 'o.png')


def test_gamma_out_of_range(subject, tmp_path):
  proc = _run(f'--subject={subject}', '--prompt=a toy', '--word=toy',
              f'--out={tmp_path}/o.png', '--config.sampler.gamma_scope=1.5')
  _assert_one_line_error(proc, 'gamma_scope', '1.5')


def test_unwritable_output(subject, tmp_path):
  proc = _run(f'--subject={subject}', '--prompt=a toy', '--word=toy',
              f'--out={tmp_path}/missing_dir/o.png')
  _assert_one_line_error(proc, 'missing_dir', 'does not exist')


def test_seed_out_of_range(subject, tmp_path):
  proc = _run(f'--subject={subject}', '--prompt=a toy', '--word=toy',
              f'--out={tmp_path}/o.png', f'--seed={2**40}')
  _assert_one_line_error(proc, '--seed', str(2**40))


def test_config_key_typo_exits_2_with_the_suggestion(tmp_path):
  proc = _run('--subject=x.png', '--prompt=a toy', '--word=toy', f'--out={tmp_path}/o.png',
              '--config.sampler.num_step=3')
  _assert_one_line_error(proc, "'num_step'", "did you mean 'num_steps'")
  assert len(proc.stderr.strip().splitlines()) == 1


def test_laion_config_without_weights_names_the_keys(subject, tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'sample.main', '--config=configs/laion.py',
       f'--subject={subject}', '--prompt=a toy', '--word=toy', f'--out={tmp_path}/o.png'],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=240)
  _assert_one_line_error(proc, '--config.pretrained=DIR', '--config.vision_encoder=DIR')


def test_an_unknown_model_family_is_one_line(tmp_path):
  Image.new('RGB', (32, 32), 'red').save(tmp_path / 'subject.png')
  proc = subprocess.run(
      [sys.executable, '-m', 'sample.main', '--config=configs/release_tiny.py',
       '--config.pipeline=sdxl', f'--subject={tmp_path / "subject.png"}',
       '--prompt=a toy', '--word=toy', f'--out={tmp_path / "out.png"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.pipeline must be one of ('paper', 'release'), got 'sdxl'")
  assert 'Traceback' not in proc.stderr
