"""DreamBench reading and the resumable evaluate() loop, on a tiny fake DreamBench."""
import csv
import os
import subprocess
import sys

import ml_collections
import numpy as np
from PIL import Image
import pytest

from realcustom_jax.eval import dreambench
from realcustom_jax.eval import metrics
from sample import eval_report
from sample import evaluate as ev

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The real file's format (google/dreambooth dataset/prompts_and_classes.txt), shortened.
PROMPTS_TXT = """Classes

subject_name,class
backpack,backpack
bear_plushie,stuffed animal
dog,dog
empty,toy

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in a chef outfit'.format(unique_token, class_token)
]
"""


def _noise(w, h, seed, mode='RGB'):
  rng = np.random.default_rng(seed)
  shape = (h, w, 3) if mode == 'RGB' else (h, w)
  return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _make_bench(root):
  """2 usable subjects (object 'backpack', live 'dog'), one empty folder, one bad image."""
  root.mkdir(exist_ok=True)
  (root / dreambench.PROMPTS_FILE).write_text(PROMPTS_TXT)
  bp = root / 'backpack'
  bp.mkdir()
  _noise(48, 40, 0).save(bp / '00.jpg')
  _noise(36, 52, 1, 'L').save(bp / '01.jpg')  # greyscale
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees on display
  _noise(40, 30, 2).save(bp / '02.jpg', exif=exif)
  mask = np.zeros((40, 30), np.uint8)  # the displayed (upright) size: 30 wide, 40 high
  mask[10:30, 5:25] = 255
  Image.fromarray(mask).save(bp / '02_mask.png')
  dog = root / 'dog'
  dog.mkdir()
  _noise(50, 50, 3).save(dog / '00.jpg')
  (dog / '01.jpg').write_bytes(b'not a jpeg at all')
  _noise(44, 38, 4).save(dog / '02.png')
  (root / 'empty').mkdir()
  (root / 'empty' / 'notes.txt').write_text('no images here')
  return root


@pytest.fixture(scope='module')
def scorers():
  return metrics.tiny_clip(0), metrics.tiny_dino(0)


class _FakeGenerator:
  """Returns one solid-colour 32 px image per prompt; records its calls."""

  def __init__(self):
    self.calls = []

  def __call__(self, subject, prompts, words, seed):
    self.calls.append((subject.size, list(prompts), list(words), seed))
    return [Image.new('RGB', (32, 32), (40 * i, 200 - 30 * i, (seed + i) % 256))
            for i in range(len(prompts))]


class _Boom:
  def __getattr__(self, name):
    raise AssertionError(f'{name} used on a fully resumed run')


def _config(k=2):
  return ml_collections.ConfigDict({'eval': {'images_per_prompt': k, 'seed': 3}})


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


# ---- dreambench ----

def test_format_prompt_drops_unique_token_cleanly():
  assert dreambench.format_prompt('a {0} {1} in the jungle', 'backpack') == (
      'a backpack in the jungle')
  assert dreambench.format_prompt('{0} {1}', 'dog') == 'dog'
  assert dreambench.format_prompt('a red {0}  {1} ', 'stuffed animal') == (
      'a red stuffed animal')


def test_parse_prompts_file_in_real_format():
  classes, obj, live = dreambench.parse_prompts_file(PROMPTS_TXT)
  assert classes == {'backpack': 'backpack', 'bear_plushie': 'stuffed animal',
                     'dog': 'dog', 'empty': 'toy'}
  assert obj == ['a {0} {1} in the jungle', 'a red {0} {1}']
  assert live == ['a {0} {1} wearing a red hat', 'a {0} {1} in a chef outfit']
  with pytest.raises(dreambench.BenchError, match='p.txt: no prompt list'):
    dreambench.parse_prompts_file('Classes\nsubject_name,class\ncan,can\n', 'p.txt')


def test_load_bench_lists_subjects_and_reports_problems(tmp_path):
  bench = dreambench.load_bench(str(_make_bench(tmp_path / 'db')))
  assert [(s.name, s.class_word, s.is_live) for s in bench.subjects] == [
      ('backpack', 'backpack', False), ('dog', 'dog', True)]
  names = [os.path.basename(p) for p in bench.subjects[0].image_paths]
  assert names == ['00.jpg', '01.jpg', '02.jpg']  # the mask file is not an image
  assert dreambench.mask_path(bench.subjects[0].image_paths[2]).endswith('02_mask.png')
  assert dreambench.mask_path(bench.subjects[0].image_paths[0]) is None
  joined = '\n'.join(bench.skipped)
  assert os.path.join('db', 'empty') in joined and 'no images' in joined
  assert 'bear_plushie' in joined  # listed without a folder


def test_load_image_upright_rgb_and_bad_file(tmp_path):
  root = _make_bench(tmp_path / 'db')
  rotated = dreambench.load_image(str(root / 'backpack' / '02.jpg'))
  assert rotated.size == (30, 40) and rotated.mode == 'RGB'
  assert dreambench.load_image(str(root / 'backpack' / '01.jpg')).mode == 'RGB'
  with pytest.raises(dreambench.BenchError, match=r'dog/01\.jpg is not an image file'):
    dreambench.load_image(str(root / 'dog' / '01.jpg'))


def test_missing_prompts_file_names_it(tmp_path):
  (tmp_path / 'dog').mkdir()
  with pytest.raises(dreambench.BenchError, match='prompts_and_classes.txt: prompts '
                                                  'file not found'):
    ev.evaluate(_config(), str(tmp_path), str(tmp_path / 'out'), _FakeGenerator(),
                _Boom(), _Boom())


# ---- evaluate ----

def test_evaluate_writes_scores_summary_grids_and_resumes(tmp_path, scorers):
  bench_dir, out = str(_make_bench(tmp_path / 'db')), str(tmp_path / 'out')
  clip, dino = scorers
  gen = _FakeGenerator()
  res = ev.evaluate(_config(k=2), bench_dir, out, gen, clip, dino)

  # 2 subjects x 2 prompts x K=2.
  rows = _read_csv(os.path.join(out, ev.SCORES_CSV))
  assert len(rows) == 8 and tuple(rows[0]) == ev.CSV_FIELDS
  assert len(gen.calls) == 4 and res['generated'] == 4
  by_prompt = {c[1][0]: c for c in gen.calls}
  assert set(by_prompt) == {'a backpack in the jungle', 'a red backpack',
                            'a dog wearing a red hat', 'a dog in a chef outfit'}
  size, prompts, words, seed = by_prompt['a red backpack']
  assert size == (48, 40)  # subject_image_index 0 -> backpack/00.jpg
  assert prompts == ['a red backpack'] * 2 and words == ['backpack'] * 2
  assert seed == ev.sample_seed(3, 'backpack', 'a red backpack')
  for r in rows:
    assert os.path.isfile(os.path.join(out, r['path']))
    for m in ev.METRICS:
      assert -1.0 <= float(r[m]) <= 1.0

  # One row checked by hand: masks on the real images are applied (backpack/02.jpg).
  r = next(r for r in rows if r['prompt'] == 'a red backpack' and r['image_index'] == '1')
  g = Image.open(os.path.join(out, r['path']))
  paths = sorted(os.path.join(bench_dir, 'backpack', n) for n in ('00.jpg', '01.jpg',
                                                                  '02.jpg'))
  real = [dreambench.load_image(p) for p in paths]
  masks = [None, None, dreambench.load_mask(dreambench.mask_path(paths[2]), (30, 40))]
  for m, s in (('clip_i', clip), ('dino_i', dino)):
    ge, re_ = s.embed_images([g])[0], s.embed_images(real, masks)
    want = np.mean([ge @ x / np.linalg.norm(ge) / np.linalg.norm(x) for x in re_])
    assert abs(float(r[m]) - want) < 1e-4, m
    unmasked = metrics.mean_pairwise_cosine(s.embed_images([g]), s.embed_images(real))
    assert abs(float(unmasked[0]) - want) > 1e-3, f'{m}: mask had no effect'
  t = clip.embed_texts(['a red backpack'])[0]
  ge = clip.embed_images([g])[0]
  assert abs(float(r['clip_t']) - t @ ge / np.linalg.norm(t) / np.linalg.norm(ge)) < 1e-4

  summary = {s['group']: s for s in _read_csv(os.path.join(out, ev.SUMMARY_CSV))}
  assert set(summary) == {'ALL', 'backpack', 'dog'}
  assert summary['ALL']['n'] == '8' and summary['dog']['n'] == '4'
  vals = np.array([float(r['dino_i']) for r in rows])
  assert abs(float(summary['ALL']['dino_i_mean']) - vals.mean()) < 1e-5
  assert abs(float(summary['ALL']['dino_i_std']) - vals.std()) < 1e-5
  with Image.open(os.path.join(out, 'grids', 'dog.png')) as grid:
    # 32 px images in 128 px cells; one labelled row per prompt.
    row_h = eval_report.GRID_LABEL_HEIGHT + eval_report.GRID_MIN_CELL
    assert grid.size == ((1 + 2) * eval_report.GRID_MIN_CELL, 2 * row_h)
    pixels = np.asarray(grid.convert('L'))
    bands = [pixels[i * row_h:i * row_h + eval_report.GRID_LABEL_HEIGHT] for i in range(2)]
    assert all((b < 128).any() for b in bands), 'a row has no prompt label'
    assert not np.array_equal(bands[0], bands[1]), 'both rows carry the same label'

  skipped = '\n'.join(res['skipped'])
  assert 'empty' in skipped and os.path.join('dog', '01.jpg') in skipped

  # Rerun: nothing generated or scored (the fakes raise if touched), same rows.
  res2 = ev.evaluate(_config(k=2), bench_dir, out, _Boom(), _Boom(), _Boom())
  assert res2['generated'] == 0
  assert _read_csv(os.path.join(out, ev.SCORES_CSV)) == rows

  # A lost PNG regenerates only its (subject, prompt) pair.
  os.remove(os.path.join(out, rows[0]['path']))
  gen3 = _FakeGenerator()
  res3 = ev.evaluate(_config(k=2), bench_dir, out, gen3, clip, dino)
  assert len(gen3.calls) == 1 and gen3.calls[0][1][0] == rows[0]['prompt']
  assert len(_read_csv(os.path.join(out, ev.SCORES_CSV))) == 8
  assert len(res3['rows']) == 8


def test_cli_missing_bench_dir_exits_2_with_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'sample.evaluate', '--config=configs/tiny.py',
       f'--bench_dir={tmp_path / "nope"}', f'--out_dir={tmp_path / "out"}'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f'evaluate: {tmp_path / "nope"}: benchmark directory not found')
  assert 'Traceback' not in proc.stderr


def test_prompt_limit_and_subject_image_index(tmp_path, scorers):
  bench_dir = str(_make_bench(tmp_path / 'db'))
  config = ml_collections.ConfigDict(
      {'eval': {'images_per_prompt': 1, 'prompt_limit': 1, 'subject_image_index': 2}})
  gen = _FakeGenerator()
  res = ev.evaluate(config, bench_dir, str(tmp_path / 'out'), gen, *scorers)
  # backpack/02.jpg (EXIF-rotated, upright 30x40) conditions; dog has only 2 readable.
  assert [c[0] for c in gen.calls] == [(30, 40)]
  assert [r['prompt'] for r in res['rows']] == ['a backpack in the jungle']
  assert any('dog: subject_image_index 2 out of range' in s for s in res['skipped'])


def test_cli_end_to_end_with_the_real_tiny_pipeline(tmp_path):
  """The whole harness through `RealCustomPipeline` (tiny random models, 2 DDIM steps)."""
  bench_dir, out = _make_bench(tmp_path / 'db'), tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, '-m', 'sample.evaluate', '--config=configs/tiny.py',
       f'--bench_dir={bench_dir}', f'--out_dir={out}', '--config.sampler.num_steps=2',
       '--config.eval.prompt_limit=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = _read_csv(out / ev.SCORES_CSV)
  # prompt_limit=1 per list: backpack (object) and dog (live), 1 image each.
  assert sorted(r['subject'] for r in rows) == ['backpack', 'dog']
  for r in rows:
    with Image.open(out / r['path']) as img:
      assert img.size == (32, 32)  # configs/tiny.py resolution
    assert all(-1.0 <= float(r[m]) <= 1.0 for m in ev.METRICS)
  assert (out / ev.SUMMARY_CSV).is_file()


def test_skipped_items_are_one_summary_printed_once(tmp_path, scorers, capsys, caplog):
  """A DreamBench subset: 27 absent subjects are one line, and the summary appears once."""
  root = _make_bench(tmp_path / 'db')
  names = [f'subject{i:02d}' for i in range(27)]
  extra = ''.join(f'{n},toy\n' for n in names)
  (root / dreambench.PROMPTS_FILE).write_text(
      PROMPTS_TXT.replace('empty,toy\n', 'empty,toy\n' + extra))
  config = ml_collections.ConfigDict({'eval': {'images_per_prompt': 1, 'prompt_limit': 1}})
  res = ev.evaluate(config, str(root), str(tmp_path / 'out'), _FakeGenerator(), *scorers)
  assert len(res['skipped']) >= 28
  out, err = capsys.readouterr()
  assert out.count('Skipped') == 1 and 'Skipped' not in err
  assert 'Skipped' not in caplog.text
  summary = out[out.index('Skipped'):].splitlines()
  absent = [line for line in summary if 'have no folder' in line]
  assert len(absent) == 1 and '28 subject(s)' in absent[0] and '+23 more' in absent[0]
  assert not any('subject26' in line for line in summary)  # counted, not listed
  assert any(os.path.join('dog', '01.jpg') in line for line in summary)


def test_sampler_compiles_before_the_progress_bar(tmp_path, scorers, monkeypatch):
  """The first sample (the compile) is made before tqdm starts, and is not made twice."""
  events = []

  class _Bar:
    def __init__(self, *args, **kwargs):
      events.append('bar')
    def __enter__(self):
      return self
    def __exit__(self, *exc):
      return False
    def update(self, n=1):
      pass

  class _Recorder(_FakeGenerator):
    def __call__(self, *args):
      events.append('generate')
      return super().__call__(*args)

  monkeypatch.setattr(ev.tqdm, 'tqdm', _Bar)
  gen = _Recorder()
  res = ev.evaluate(_config(k=2), str(_make_bench(tmp_path / 'db')), str(tmp_path / 'out'),
                    gen, *scorers)
  assert events[:2] == ['generate', 'bar']
  assert len(gen.calls) == res['generated'] == 4  # the warm-up sample is used, not redone
  assert len(res['rows']) == 8


def test_cli_config_key_typo_exits_2_with_suggestion(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'sample.evaluate', '--config=configs/tiny.py',
       f'--bench_dir={tmp_path}', f'--out_dir={tmp_path / "out"}',
       '--config.eval.images_per_promt=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      "evaluate: --config.eval.images_per_promt: the config has no key "
      "'images_per_promt' (did you mean 'images_per_prompt'?)"]
