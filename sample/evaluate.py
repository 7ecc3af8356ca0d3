"""DreamBench evaluation (Sec. 4.1, Table 1): generate, then score CLIP-T, CLIP-I, DINO-I.

  python -m sample.evaluate --config=configs/tiny.py --bench_dir=DIR --out_dir=OUT

For every subject of the DreamBench-layout `DIR` and every prompt of its list (object or
live), K = `config.eval.images_per_prompt` images are generated from one real image of
the subject (`config.eval.subject_image_index`), the class word being the real word.
Writes under OUT:
  images/<subject>/pNN_<prompt>_<k>.png   generated images
  scores.csv                              one row per generated image
  summary.csv                             mean/std of each metric, overall and per subject
  grids/<subject>.png                     one row per prompt, labelled with it: the
                                          reference image, then the K generated ones
A rerun skips (subject, prompt) pairs already in scores.csv with their PNGs; PNGs without
rows are rescored, not regenerated (delete scores.csv to rescore, e.g. after adding
`NAME_mask.png` subject masks beside the images).
"""
import dataclasses
import os
import re
import sys
import zlib
from typing import Callable, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image
import tqdm

from realcustom_jax.runtime import cli
from sample import eval_report
from sample.eval_report import CSV_FIELDS
from sample.eval_report import METRICS
from realcustom_jax.eval import dreambench
from realcustom_jax.eval import metrics

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program: tests import `evaluate` beside other entry
  points (sample.app) that define --config in the same process."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/*.py).')
  flags.DEFINE_string('bench_dir', None, 'DreamBench-layout directory.')
  flags.DEFINE_string('out_dir', None, 'Output directory (resumable).')
  cli.define_compile_cache_flags()


EVAL_DEFAULTS = dict(
    clip_model='',  # local CLIP ViT-B/32 dir; empty: tiny random CLIP (plumbing only)
    dino_model='',  # local DINO ViT-S/16 dir; empty: tiny random ViT
    images_per_prompt=4,
    subject_image_index=0,  # which real image (sorted by name) conditions generation
    prompt_limit=0,  # first N prompts of each list; 0 = all
    seed=0,
)
SCORES_CSV = 'scores.csv'
SUMMARY_CSV = 'summary.csv'

# generate_fn(subject_image, prompts, words, seed) -> one PIL image per prompt.
GenerateFn = Callable[[Image.Image, Sequence[str], Sequence[str], int], list]


def eval_config(config: ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """`config.eval` over `EVAL_DEFAULTS` (keys missing from the config get defaults)."""
  out = ml_collections.ConfigDict(EVAL_DEFAULTS)
  given = config.get('eval', None) if config is not None else None
  for k, v in (given or {}).items():
    out[k] = v
  return out


def sample_seed(base: int, subject: str, prompt: str) -> int:
  """Seed of a (subject, prompt) pair, stable under reordering or adding subjects."""
  return (int(base) * 1_000_003 + zlib.crc32(f'{subject}|{prompt}'.encode())) % (2**31)


def pipeline_generate_fn(config: ml_collections.ConfigDict) -> GenerateFn:
  """Wraps the pipeline `config` asks for (`pipelines.load_pipeline`) as a `GenerateFn`."""
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  pipe = pipelines.load_pipeline(config)

  def generate(subject, prompts, words, seed):
    return pipe([subject] * len(prompts), list(prompts), list(words), seed=seed).images
  return generate


@dataclasses.dataclass
class _Lazy:
  """Builds a scorer on first use, so a fully resumed run loads no model."""
  path: str
  load: Callable
  tiny: Callable
  seed: int
  value: object = None

  def get(self):
    if self.value is None:
      if self.path:
        self.value = self.load(self.path)
      else:
        logging.warning('No model dir configured: using a tiny RANDOM %s; scores are '
                        'meaningless', self.load.__name__.removeprefix('load_'))
        self.value = self.tiny(self.seed)
    return self.value


def _slug(text: str, n: int = 48) -> str:
  return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_')[:n] or 'prompt'


def _relative_paths(subject: str, index: int, prompt: str, k_images: int) -> list[str]:
  """Where the K images of prompt `index` of `subject` go, relative to out_dir."""
  return [os.path.join('images', subject, f'p{index:02d}_{_slug(prompt)}_{k}.png')
          for k in range(k_images)]


def _first_missing(bench, templates, ecfg, out_dir: str, k_images: int):
  """(subject, prompt index, prompt, reference image) of the first pair to generate.

  None when every image exists (or only unusable subjects lack images).
  """
  for subject in bench.subjects:
    for pi, template in enumerate(templates(subject)):
      prompt = dreambench.format_prompt(template, subject.class_word)
      paths = _relative_paths(subject.name, pi, prompt, k_images)
      if all(os.path.isfile(os.path.join(out_dir, p)) for p in paths):
        continue
      real, _ = eval_report.load_images(subject.image_paths, [])  # the loop reports the failures
      idx = int(ecfg.subject_image_index)
      if not 0 <= idx < len(real):
        break  # the loop skips this subject
      return subject, pi, prompt, real[idx]
  return None


def score_images(clip_s, dino_s, real_emb, prompt: str, gen, paths) -> dict:
  """CLIP-T, CLIP-I and DINO-I of one prompt's generated images (masked where a mask
  file lies beside an image) against the subject's embedded real images."""
  gen_masks = []
  for im, p in zip(gen, paths):
    mp = dreambench.mask_path(p)
    gen_masks.append(dreambench.load_mask(mp, im.size) if mp else None)
  text_emb = clip_s.embed_texts([prompt])
  gen_clip = clip_s.embed_images(gen, gen_masks)
  gen_dino = dino_s.embed_images(gen, gen_masks)
  return {'clip_t': np.asarray(metrics.clip_t(text_emb, gen_clip)),
          'clip_i': np.asarray(metrics.clip_i(gen_clip, real_emb[0])),
          'dino_i': np.asarray(metrics.dino_i(gen_dino, real_emb[1]))}


@dataclasses.dataclass
class _Run:
  """What one `evaluate` call accumulates while it walks the subjects."""
  config: ml_collections.ConfigDict
  ecfg: ml_collections.ConfigDict
  out_dir: str
  k_images: int
  generate: GenerateFn | None
  clip: '_Lazy'
  dino: '_Lazy'
  previous: dict  # (subject, prompt, k, seed) -> CSV row, this run's and earlier runs'
  skipped: list
  rows: list = dataclasses.field(default_factory=list)
  ready: dict = dataclasses.field(default_factory=dict)  # (subject, prompt index) -> images
  generated: int = 0

  def images(self, reference, subject, prompt: str, seed: int) -> list:
    """generate_fn's k images of one prompt (the pipeline's, built on first use)."""
    if self.generate is None:
      self.generate = pipeline_generate_fn(self.config)
    self.generated += 1
    return list(self.generate(reference, [prompt] * self.k_images,
                              [subject.class_word] * self.k_images, seed))


def _reference(subject, ecfg, skipped: list):
  """(reference image, the subject's readable images, their masks), or None (skipped)."""
  real, real_masks = eval_report.load_images(subject.image_paths, skipped)
  if not real:
    skipped.append(f'{subject.name}: no readable images, subject skipped')
    return None
  idx = int(ecfg.subject_image_index)
  if not 0 <= idx < len(real):
    skipped.append(f'{subject.name}: subject_image_index {idx} out of range '
                   f'({len(real)} readable images), subject skipped')
    return None
  return real[idx], real, real_masks


def _evaluate_subject(run: _Run, subject, templates: list[str], reference, real,
                      real_masks, bar) -> None:
  """Generates (or reads back) and scores one subject's prompts; writes its grid."""
  scores_path = os.path.join(run.out_dir, SCORES_CSV)
  real_emb = None  # embedded only when this subject has work to do
  os.makedirs(os.path.join(run.out_dir, 'images', subject.name), exist_ok=True)
  grid_rows, grid_prompts = [], []
  for pi, template in enumerate(templates):
    prompt = dreambench.format_prompt(template, subject.class_word)
    seed = sample_seed(run.ecfg.seed, subject.name, prompt)
    rel = _relative_paths(subject.name, pi, prompt, run.k_images)
    paths = [os.path.join(run.out_dir, r) for r in rel]
    keys = [(subject.name, prompt, k, seed) for k in range(run.k_images)]
    grid_rows.append(paths)
    grid_prompts.append(prompt)
    have_png = all(os.path.isfile(p) for p in paths)
    if have_png and all(k in run.previous for k in keys):
      run.rows.extend(run.previous[k] for k in keys)
      bar.update(1)
      continue
    if have_png:
      gen, _ = eval_report.load_images(paths, run.skipped)
      have_png = len(gen) == run.k_images
    if not have_png:
      gen = run.ready.pop((subject.name, pi), None)
      if gen is None:
        gen = run.images(reference, subject, prompt, seed)
      if len(gen) != run.k_images:
        raise RuntimeError(f'generate_fn returned {len(gen)} images for {run.k_images} '
                           'prompts')
      for im, p in zip(gen, paths):
        im.convert('RGB').save(p)
    clip_s, dino_s = run.clip.get(), run.dino.get()
    if real_emb is None:
      real_emb = (clip_s.embed_images(real, real_masks),
                  dino_s.embed_images(real, real_masks))
    scores = score_images(clip_s, dino_s, real_emb, prompt, gen, paths)
    for k in range(run.k_images):
      row = {'subject': subject.name, 'class': subject.class_word, 'prompt': prompt,
             'image_index': k, 'seed': seed, 'path': rel[k]}
      row |= {m: float(scores[m][k]) for m in METRICS}
      run.rows.append(row)
      run.previous[keys[k]] = row
    # Rows of earlier runs outside this plan (e.g. a larger prompt_limit) are kept.
    eval_report.write_csv(scores_path, CSV_FIELDS, list(run.previous.values()))
    bar.update(1)
  if grid_rows:
    eval_report.write_grid(os.path.join(run.out_dir, 'grids', f'{subject.name}.png'),
                           reference, grid_rows, grid_prompts, run.k_images, run.skipped)


def evaluate(config: ml_collections.ConfigDict, bench_dir: str, out_dir: str,
             generate_fn: GenerateFn | None = None, clip=None, dino=None) -> dict:
  """Generates and scores DreamBench; resumable.

  Args:
    config: the run config; reads `config.eval` (see `EVAL_DEFAULTS`) and, when no
      `generate_fn` is given, builds `RealCustomPipeline.from_config(config)`.
    bench_dir: DreamBench-layout directory.
    out_dir: where images, CSVs and grids go.
    generate_fn: `(subject_image, prompts, words, seed) -> [PIL image per prompt]`;
      default: the RealCustom pipeline.
    clip: a `metrics.ClipScorer`; default from `config.eval.clip_model`.
    dino: a `metrics.DinoScorer`; default from `config.eval.dino_model`.

  Returns:
    dict with 'rows' (this run's per-image rows), 'summary', 'skipped' (messages),
    'generated' (number of generate_fn calls).

  Raises:
    dreambench.BenchError: `bench_dir` or its prompts file is missing or unusable.
  """
  ecfg = eval_config(config)
  k_images = int(ecfg.images_per_prompt)
  if k_images < 1:
    raise dreambench.BenchError(f'config.eval.images_per_prompt must be >= 1, got {k_images}')
  bench = dreambench.load_bench(bench_dir)
  skipped = list(bench.skipped)
  os.makedirs(out_dir, exist_ok=True)
  run = _Run(config, ecfg, out_dir, k_images, generate_fn,
             _Lazy(ecfg.clip_model, metrics.load_clip, metrics.tiny_clip, ecfg.seed, clip),
             _Lazy(ecfg.dino_model, metrics.load_dino, metrics.tiny_dino, ecfg.seed, dino),
             eval_report.read_rows(os.path.join(out_dir, SCORES_CSV), skipped), skipped)
  limit = int(ecfg.prompt_limit)

  def templates(s):
    t = bench.live_prompts if s.is_live else bench.object_prompts
    return t[:limit] if limit > 0 else t

  # The first sample compiles the sampler (tens of seconds): made before the progress
  # bar starts, so that the bar's rate and ETA are true from its first tick.
  first = _first_missing(bench, templates, ecfg, out_dir, k_images)
  if first is not None:
    subject, pi, prompt, reference = first
    logging.info('compiling the sampler: generating "%s" for %s first', prompt,
                 subject.name)
    run.ready[(subject.name, pi)] = run.images(
        reference, subject, prompt, sample_seed(ecfg.seed, subject.name, prompt))
  total = sum(len(templates(s)) for s in bench.subjects)
  with tqdm.tqdm(total=total, desc='dreambench', unit='prompt') as bar:
    for subject in bench.subjects:
      found = _reference(subject, ecfg, skipped)
      if found is None:
        bar.update(len(templates(subject)))
        continue
      _evaluate_subject(run, subject, templates(subject), *found, bar)

  summary = eval_report.summarize(run.rows)
  eval_report.write_csv(os.path.join(out_dir, SUMMARY_CSV),
                        ['group', 'n'] + [f'{m}_{s}' for m in METRICS
                                          for s in ('mean', 'std')], summary)
  print(eval_report.format_table(summary))
  if skipped:
    print(eval_report.format_skipped(skipped))  # once, on stdout with the table
  return {'rows': run.rows, 'summary': summary, 'skipped': skipped,
          'generated': run.generated}


def _fail(msg: str) -> None:
  sys.stderr.write(f'evaluate: {msg}\n')
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if FLAGS.config is None:
    _fail('--config is required (e.g. --config=configs/tiny.py)')
  if not FLAGS.bench_dir:
    _fail('--bench_dir is required')
  if not FLAGS.out_dir:
    _fail('--out_dir is required')
  cli.enable_compile_cache()  # before the first compile
  cli.quiet_libraries()
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  missing_weights = pipelines.missing_weights_message(FLAGS.config)
  if missing_weights:
    _fail(missing_weights)
  try:
    evaluate(FLAGS.config, FLAGS.bench_dir, FLAGS.out_dir)
  except (dreambench.BenchError, FileNotFoundError) as e:
    _fail(str(e))


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.flags_parser('evaluate: '))
