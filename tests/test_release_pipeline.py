"""The authors' release end to end: our jitted sampler against the release's own loop,
the release pipeline (`release_pipeline`, configs/release_tiny.py) with its input
preparation, `sample.main` and `sample.evaluate` on it.

tests/fixtures/release_e2e/ holds the release's denoising loop (its UNet with the
weights of tests/fixtures/release_unet, its mask_generation, CFG and schedulers) run
from fixed inputs (make_fixtures.py there).
"""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from realcustom_jax import adapter as adapter_lib
from realcustom_jax.release import paths as release_paths
from realcustom_jax import sampler
from realcustom_jax import schedules
from realcustom_jax.release import model as release_model_lib
from realcustom_jax.release import sampler as release_sampler
from tests import release_unet_fixture

E2E = os.path.join(os.path.dirname(__file__), 'fixtures', 'release_e2e', 'release_e2e.npz')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
E2E_TOL = 1e-3  # the bar (max |x0| here is 81; measured 1.0e-4 / 1.2e-4)


@pytest.fixture(scope='module')
def e2e():
  with np.load(E2E) as z:
    return dict(z)


@pytest.fixture(scope='module')
def release_model(tmp_path_factory):
  pytest.importorskip('torch')  # the converter reads the release's pickle
  model, base, adapter = release_unet_fixture.build_model(
      str(tmp_path_factory.mktemp('release_e2e')))
  return model, adapter_lib.merge_params({'unet': base}, adapter)


def _release_run(model, params, z, solver, steps, mode, reuse):
  settings = sampler.GuidanceSettings.create(
      guidance_image=3.5, gamma_scope=0.25, mask_strategy=mode, mask_reused_step=reuse)
  b = z['latents'].shape[0]
  conditions = sampler.Conditions(
      text=jnp.asarray(z['text']), uncond_text=jnp.asarray(z['negative_text']),
      image=(z['global_features'], z['local_features']),
      word_weights=jnp.broadcast_to(jnp.asarray(z['target_token']), (b, z['text'].shape[1])),
      uncond_image=(z['negative_global'], z['negative_local']),
      added={'text_embeds': z['pooled'], 'time_ids': z['time_ids']},
      uncond_added={'text_embeds': z['negative_pooled'], 'time_ids': z['time_ids']})
  args = (params, schedules.release_schedule(steps, solver), jnp.asarray(z['latents']),
          conditions, settings)
  fn = release_sampler.build_sampler(model, return_trajectory=True)
  # Each program runs once: XLA's CPU optimisations cost more than they save.
  compiled = fn.lower(*args).compile(compiler_options={'xla_backend_optimization_level': 0})
  return compiled(*args)


def test_sampler_matches_the_release_loop(release_model, e2e):
  """Same latents, features and weights, the release's defaults (DPM-Solver++, 'max_norm',
  mask reuse) on 4 steps: its final x0 (what it decodes) and every step's mask."""
  model, params = release_model
  out = _release_run(model, params, e2e, 'dpm_solver_2s', 4, ('max_norm',), 2)
  expected = e2e['dpm_x0']
  np.testing.assert_allclose(np.asarray(out.latents), expected, rtol=0, atol=E2E_TOL)
  np.testing.assert_allclose(np.asarray(out.masks), e2e['dpm_masks'], rtol=0, atol=1e-5)
  # The output is the last x0, not z after the last update (DPM ends at timestep 0).
  assert np.abs(e2e['dpm_prev_sample'] - expected).max() > 10 * E2E_TOL


# ---- The release's input preparation ----

def test_target_tokens_are_the_release_phrase_positions():
  from realcustom_jax import encoders  # pylint: disable=g-import-not-at-top
  from realcustom_jax.release import pipeline as rp  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import tiny  # pylint: disable=g-import-not-at-top
  tok = tiny.build_tokenizer()
  tok2 = tiny.build_tokenizer()
  tok2.pad_token = '!'
  # Whole words: the tokens our paper pipeline marks (start token at 0).
  for prompt, word in (('a toy on the beach', 'toy'), ('a red toy and a red car', 'red'),
                       ('a zebra on the grass', 'zebra'), ('a teddy bear in the park',
                                                           'teddy bear')):
    np.testing.assert_array_equal(rp.target_token_weights(tok, tok2, prompt, word),
                                  encoders.word_token_weights(tok, [prompt], [word])[0])
  # str.find: case-sensitive substrings, as the release's find_phrase_positions_in_text.
  with pytest.raises(ValueError, match='does not occur'):
    rp.target_token_weights(tok, tok2, 'a Toy on the beach', 'toy')
  # 'cat' inside 'catcat': the release marks the tokens up to the end of the match.
  weights = rp.target_token_weights(tok, tok2, 'a catcat', 'cat')
  assert weights[0] == 0 and weights[1] == 0 and weights[2:].sum() >= 1


def test_reference_preparation_is_torch_bilinear():
  torch = pytest.importorskip('torch')
  from realcustom_jax.release import pipeline as rp  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for (h, w), size in (((40, 50), 56), ((97, 61), 32), ((20, 20), 20)):
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    x = torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)[None]
    expected = torch.nn.functional.interpolate(x, size=(size, size), mode='bilinear',
                                               align_corners=False)[0].permute(1, 2, 0)
    np.testing.assert_allclose(rp.reference_pixels(image, size), expected.numpy(), atol=1e-5)


# ---- The pipeline on tiny random weights (configs/release_tiny.py) ----

def _tiny_config(folder):
  from configs import release_tiny  # pylint: disable=g-import-not-at-top
  config = release_tiny.get_config()
  config.tiny_release.dir = str(folder)
  return config


def _subject():
  return Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), np.uint8))


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """One pipeline, one sampler compile for this file (return_masks=False throughout:
  the evaluation reuses it in memory, the CLI run through the persistent cache)."""
  pytest.importorskip('torch')  # the tiny release's .pth is written with torch
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('release_tiny')
  config = _tiny_config(folder)
  pipe = pipelines.load_pipeline(config)
  out = pipe([_subject()], ['a toy on the beach'], ['toy'], seed=0)
  return folder, config, pipe, out


def test_release_config_builds_the_release_pipeline(tiny_run):
  """configs/release_tiny.py: files written, the .pth converted, the release model."""
  from realcustom_jax.release import pipeline as rp  # pylint: disable=g-import-not-at-top
  folder, config, pipe, out = tiny_run
  assert isinstance(pipe, rp.ReleasePipeline)
  assert isinstance(pipe.model, release_model_lib.ReleaseRealCustom) and pipe.model.unet.has_added_cond
  assert pipe.reference_size == 56  # patchify_scale 2 x 28 px views (the release: 768)
  assert os.path.isfile(folder / 'realcustom_tiny.pth')
  assert os.path.isfile(folder / 'adapter.safetensors')
  assert out.images[0].size == (config.width, config.height)
  assert np.asarray(out.images[0]).std() > 0
  schedule = pipe.schedule(config.sampler.num_steps)
  assert schedule.solver == 'dpm_solver_2s' and schedule.output == 'x0'


def test_the_negative_branch_is_the_zero_image_and_negative_prompt(tiny_run):
  _, config, pipe, _ = tiny_run
  size = pipe.reference_size
  feats, negative = pipe.encode_subjects([_subject()], 2)
  zero = pipe._encode_image(pipe.encoder.params, jnp.zeros((1, size, size, 3)))  # pylint: disable=protected-access
  for got, want in zip(negative, zero):
    assert got.shape[0] == 2
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[0]))
  assert np.abs(np.asarray(feats[0]) - np.asarray(negative[0])).max() > 1e-3
  enc = pipe.encode_prompts(['a toy on the beach', 'a dog'], ['toy', 'dog'])
  alone = pipe.encode_prompts([config.negative_prompt[:40]], [config.negative_prompt[:5]])
  assert enc.uncond_text.shape == enc.text.shape
  np.testing.assert_array_equal(np.asarray(enc.uncond_text[0]), np.asarray(enc.uncond_text[1]))
  assert np.abs(np.asarray(enc.uncond_text[0]) - np.asarray(alone.text[0])).max() > 0
  np.testing.assert_array_equal(np.asarray(enc.added['time_ids'][0]),
                                [config.width, config.height, 0, 0, config.width,
                                 config.height])


def test_a_release_adapter_without_a_config_gets_the_release_pipeline(tiny_run):
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  from realcustom_jax.release import pipeline as rp  # pylint: disable=g-import-not-at-top
  folder = tiny_run[0]
  adapter = str(folder / 'adapter.safetensors')
  assert pipelines.adapter_family_name(adapter) == 'release'
  paths = dict(pretrained=str(folder / 'sdxl'), vision_encoder=str(folder / 'vision'),
               adapter=adapter)
  # Without a config the release's own settings apply: its ViT layers 25 / 22, which the
  # 2-block tiny towers do not have (the release loader says so) ...
  with pytest.raises(ValueError, match='block index 25 is out of range'):
    pipelines.load_pipeline(**paths)
  # ... and with the tiny release config's settings the files load.
  pipe = pipelines.load_pipeline(tiny_run[1], **paths)
  assert isinstance(pipe, rp.ReleasePipeline)


def test_adapter_kinds_and_missing_paths_are_one_line_errors(tiny_run, tmp_path):
  from configs import release  # pylint: disable=g-import-not-at-top
  from configs import tiny as tiny_config  # pylint: disable=g-import-not-at-top
  from realcustom_jax import pipeline  # pylint: disable=g-import-not-at-top
  folder = tiny_run[0]
  paper = tiny_config.get_config()
  paper.adapter = str(folder / 'adapter.safetensors')
  with pytest.raises(ValueError, match="the authors' released") as e:
    pipeline.RealCustomPipeline.from_config(paper)
  assert '\n' not in str(e.value)
  config = release.get_config()
  assert '--pretrained' in release_paths.release_paths_message(config)
  config.pretrained = str(tmp_path / 'nowhere')
  config.vision_encoder = str(folder / 'vision')
  config.adapter = str(folder / 'adapter.safetensors')
  assert (release_paths.release_paths_message(config)
          == f'--pretrained={config.pretrained}: no such directory')
  config.pretrained = str(folder / 'sdxl')
  assert release_paths.release_paths_message(config) is None


def test_evaluate_runs_the_release_pipeline(tiny_run, tmp_path, monkeypatch):
  """sample.evaluate builds its pipeline with pipelines.load_pipeline, which gives the
  release pipeline for this config (tested above); the fixture's instance stands in for
  the rebuild so that its compiled sampler is reused."""
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  from sample import evaluate as ev  # pylint: disable=g-import-not-at-top
  from tests import test_evaluate  # pylint: disable=g-import-not-at-top
  folder, _, pipe, _ = tiny_run
  built = []
  monkeypatch.setattr(pipelines, 'load_pipeline', lambda c: built.append(c) or pipe)
  bench = test_evaluate._make_bench(tmp_path / 'db')  # pylint: disable=protected-access
  config = _tiny_config(folder)
  config.eval.prompt_limit = 1
  result = ev.evaluate(config, str(bench), str(tmp_path / 'out'))
  assert built == [config]
  rows = result['rows']
  # prompt_limit=1 per list: backpack (object) and dog (live); 'backpack' is several
  # tokens of the tiny tokenizer.
  assert sorted(r['subject'] for r in rows) == ['backpack', 'dog']
  for r in rows:
    with Image.open(tmp_path / 'out' / r['path']) as img:
      assert img.size == (config.width, config.height)
    assert all(-1.0 <= r[m] <= 1.0 for m in ev.METRICS)


def test_sample_cli_runs_the_release_pipeline(tiny_run, tmp_path):
  """The one CLI run: configs/release_tiny.py on the files the fixture wrote."""
  folder = tiny_run[0]
  subject = tmp_path / 'subject.png'
  _subject().save(subject)
  out = tmp_path / 'out.png'
  proc = subprocess.run(
      [sys.executable, '-m', 'sample.main', '--config=configs/release_tiny.py',
       f'--config.tiny_release.dir={folder}', f'--subject={subject}',
       '--prompt=a toy on the beach', '--word=toy', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  with Image.open(out) as img:
    assert img.size == (48, 64)
  # A release config without its files: one line, exit 2.
  bad = subprocess.run(
      [sys.executable, '-m', 'sample.main', '--config=configs/release.py',
       f'--subject={subject}', '--prompt=a toy', '--word=toy', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  errors = [line for line in bad.stderr.splitlines() if line.startswith('error')]
  assert bad.returncode == 2 and len(errors) == 1, bad.stderr
  assert 'needs --pretrained' in errors[0]
