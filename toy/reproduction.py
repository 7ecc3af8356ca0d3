"""Reproduces RealCustom's dual optimum at toy scale on a CPU, from scratch.

  python -m toy.reproduction --workdir=/tmp/toy_repro           # ~20 min, 2 cores
  python -m toy.reproduction --workdir=/tmp/toy_smoke --smoke   # a few steps

Stages, each skipped or resumed when its output is already in --workdir:

1. world/      the toy world's training shards (toy/world.py).
2. base/       autoencoder and UNet trained from scratch, saved as a diffusers SD
               directory base/sd plus a CLIP vision directory base/vision (toy/base.py).
3. adapter_*/  the RealCustom adapter, trained by `python -m train.main` on the frozen
               base (subject = the training image, gamma_num ~ U[0.3, 1], image dropout),
               once with the adaptive scoring module and once with model.scoring='none';
               exported to adapter_*/adapter.safetensors. A change of the model code
               (its fingerprint is stored) retrains.
4. eval/       every variant on the same held-out subjects, prompts and seeds: plain T2I,
               RealCustom without mask (scope all ones), with adaptive mask guidance
               (Sec. 4.1 settings), a gamma_scope sweep, binary scope, no scoring.
               Writes results.json, tradeoff.png and samples.png, prints the table.

The last line printed is a JSON summary. Config: configs/toy_world.py (`--config.*`
overrides work; `--smoke` uses its 'smoke' sizes).
"""
import dataclasses
import hashlib
import json
import logging as std_logging
import os
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from realcustom_jax.runtime import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, 'configs', 'toy_world.py')

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for every stage (created; reruns resume).')
flags.DEFINE_bool('smoke', False, 'A few steps per stage: checks the wiring, not the method.')
config_flags.DEFINE_config_file('config', None, 'Config file (default configs/toy_world.py).',
                                lock_config=False)
flags.mark_flags_as_required(['workdir'])

# Sources whose change invalidates a trained adapter (and so retrains it).
_MODEL_SOURCES = ('model.py', 'projectors.py', 'scoring.py', 'unet.py', 'attention.py',
                  'kernels.py', 'adapter.py', 'selection.py', 'schedules.py',
                  'adapter_training.py')
SCORINGS = ('adaptive', 'none')


def _progress(message: str) -> None:
  """Stage progress on stderr (stdout ends with the table and the JSON line)."""
  print(f'[toy_reproduction] {message}', file=sys.stderr, flush=True)


class _DropOrbaxInfo(std_logging.Filter):
  """orbax logs several INFO lines per checkpoint; they drown the stage progress."""

  def filter(self, record):
    return record.levelno > std_logging.INFO or '/orbax/' not in record.pathname


@dataclasses.dataclass(frozen=True)
class Variant:
  """One inference setting of the comparison."""
  name: str
  scoring: str = 'adaptive'  # which adapter; '' = plain T2I (no adapter)
  gamma_scope: float = 0.25
  binary: bool = False

  @property
  def scope(self) -> str:
    if not self.scoring:
      return '-'
    if self.binary and self.gamma_scope >= 1.0:
      return 'all ones'
    return 'binary' if self.binary else 'soft'


def variants(config) -> list[Variant]:
  """Plain T2I, no mask, the paper's setting, the gamma sweep, binary, no scoring."""
  out = [Variant('plain_t2i', scoring=''),
         # Binary top-k at gamma 1 keeps every position: the scope is all ones, so Eq. 12
         # gates nothing and z_t is not masked: RealCustom without mask guidance.
         Variant('no_mask', gamma_scope=1.0, binary=True),
         Variant('realcustom', gamma_scope=0.25)]
  out += [Variant(f'gamma_{g:g}', gamma_scope=float(g))
          for g in config.toy.gamma_scopes if abs(g - 0.25) > 1e-9]
  out.append(Variant('binary_0.25', gamma_scope=0.25, binary=True))
  if config.toy.train_none_scoring:
    out += [Variant('no_scoring', scoring='none', gamma_scope=0.25),
            Variant('no_scoring_no_mask', scoring='none', gamma_scope=1.0, binary=True)]
  return out


# ---------------------------------------------------------------------------------
# Stages 1-2: world and base model
# ---------------------------------------------------------------------------------


def stage_world(config, workdir: str) -> str:
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  shards = os.path.join(workdir, 'world', 'shards')
  if not os.path.isdir(shards):
    toy_world.write_world_shards(shards, int(config.toy.num_train_images),
                                 int(config.resolution), seed=config.seed)
  return shards


def stage_base(config, workdir: str) -> tuple[str, str]:
  """Trains (or resumes, or skips) the autoencoder and the UNet; returns (sd, vision) dirs."""
  base = os.path.join(workdir, 'base')
  sd_dir, vision_dir = os.path.join(base, 'sd'), os.path.join(base, 'vision')
  if os.path.isfile(os.path.join(sd_dir, 'model_index.json')):
    return sd_dir, vision_dir
  import numpy as np  # pylint: disable=g-import-not-at-top
  from toy import base as toy_base  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  os.makedirs(base, exist_ok=True)
  # The same scenes as the shards (same seed): the base sees what the adapter sees.
  images, captions = toy_world.render_arrays(int(config.toy.num_train_images),
                                             int(config.resolution), config.seed)
  t0 = time.perf_counter()
  vae_params = toy_base.train_vae(config, images, base)
  vae = toy_base.build_vae(config)
  raw = toy_base.encode_latents(vae, vae_params, images)
  # SD's recipe: scale latents to unit variance for the diffusion model.
  scaling = float(1.0 / raw.std())
  recon = toy_base.decode_latents(vae, vae_params, raw[:256])
  from toy import metrics as toy_metrics  # pylint: disable=g-import-not-at-top
  pixel_acc = float(np.mean(toy_metrics.quantize(recon) == toy_metrics.quantize(images[:256])))
  _progress(f'vae: {time.perf_counter() - t0:.0f}s, latent scaling {scaling:.3f}, palette '
            f'accuracy of reconstructions {pixel_acc:.3f}')

  t0 = time.perf_counter()
  tokenizer = toy_base.build_tokenizer()
  text_encoder, text_params = toy_base.build_text_encoder(config, tokenizer)
  unique = sorted(set(captions))
  features = toy_base.encode_captions(text_encoder, text_params, tokenizer, unique + [''])
  index = {c: i for i, c in enumerate(unique)}
  caption_ids = np.asarray([index[c] for c in captions])
  unet_params = toy_base.train_unet(config, raw * scaling, caption_ids, features, base)
  _progress(f'unet: {time.perf_counter() - t0:.0f}s')
  with open(os.path.join(base, 'base_stats.json'), 'w') as f:
    json.dump({'vae_palette_accuracy': pixel_acc, 'latent_scaling': scaling}, f)
  # model_index.json is written last: its presence marks a complete base model.
  return toy_base.save_pretrained(os.path.join(base), config, unet_params, vae_params,
                                  scaling, text_encoder, text_params, tokenizer)


# ---------------------------------------------------------------------------------
# Stage 3: adapters through train.main
# ---------------------------------------------------------------------------------


def model_fingerprint() -> str:
  h = hashlib.sha256()
  for name in _MODEL_SOURCES:
    with open(os.path.join(ROOT, 'realcustom_jax', name), 'rb') as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _override_flags(config) -> list[str]:
  """The scalar keys of the sections train.main reads, as --config.* flags.

  The subprocess reads the same config file; passing these carries --config.*
  overrides given to this script (tuples keep the file's values).
  """
  out = []
  for section in ('model', 'data', 'train', 'sampler'):
    for key, value in config[section].items():
      if isinstance(value, (bool, int, float, str)) and key != 'debug_nan_step':
        out.append(f'--config.{section}.{key}={value}')
  return out


def stage_adapter(config, workdir: str, scoring: str, sd_dir: str, vision_dir: str,
                  shards: str) -> str:
  """Trains one adapter with `python -m train.main` and exports it; returns the file."""
  adir = os.path.join(workdir, f'adapter_{scoring}')
  out = os.path.join(adir, 'adapter.safetensors')
  stamp_path = os.path.join(adir, 'fingerprint.json')
  stamp = {'model_code': model_fingerprint(), 'num_steps': int(config.train.num_steps)}
  if os.path.isdir(adir):
    old = json.load(open(stamp_path)) if os.path.isfile(stamp_path) else None
    if old != stamp:
      _progress(f'adapter_{scoring}: model code or steps changed ({old} -> {stamp}): '
                'retraining')
      shutil.rmtree(adir)
  if os.path.isfile(out):
    return out
  os.makedirs(adir, exist_ok=True)
  with open(stamp_path, 'w') as f:
    json.dump(stamp, f)
  cmd = [sys.executable, '-m', 'train.main', f'--config={CONFIG_FILE}',
         f'--workdir={os.path.join(adir, "workdir")}',
         f'--config.pretrained={sd_dir}', f'--config.vision_encoder={vision_dir}',
         f'--config.seed={config.seed}',
         # One prepared ArrayRecord set for both adapters.
         f'--config.data.tfds_data_dir={os.path.join(workdir, "world", "tfds")}',
         f'--config.data.shards_dir={shards}'] + [
             f for f in _override_flags(config)
             if not f.startswith(('--config.data.shards_dir', '--config.data.tfds_data_dir',
                                  '--config.model.scoring'))] + [
             f'--config.model.scoring={scoring}']
  t0 = time.perf_counter()
  _run_logged(cmd, os.path.join(adir, 'train.log'), f'adapter_{scoring}: train.main')
  _run_logged([sys.executable, '-m', 'train.export', f'--workdir={os.path.join(adir, "workdir")}',
               f'--out={out}'], os.path.join(adir, 'export.log'), f'adapter_{scoring}: export')
  _progress(f'adapter_{scoring}: trained and exported in {time.perf_counter() - t0:.0f}s')
  return out


def _run_logged(cmd: list[str], log_path: str, what: str) -> None:
  """Runs a command from the repository root, its output into `log_path`."""
  with open(log_path, 'w') as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)
  if proc.returncode != 0:
    with open(log_path) as log:
      tail = log.read()[-1500:]
    raise RuntimeError(f'{what} failed (status {proc.returncode}); see {log_path}:\n{tail}')


# ---------------------------------------------------------------------------------
# Stage 4: evaluation
# ---------------------------------------------------------------------------------


def _pipeline(config, sd_dir, vision_dir, adapter, scoring):
  from realcustom_jax.pipeline import RealCustomPipeline  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  c.model.scoring = scoring
  return RealCustomPipeline.from_pretrained(sd_dir, vision_dir, adapter, c)


def stage_eval(config, workdir: str, sd_dir: str, vision_dir: str,
               adapters: dict[str, str]) -> dict:
  """Samples every variant on the same cases and seeds; scores, plots, writes results."""
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  results_path = os.path.join(out_dir, 'results.json')
  key = _eval_key(config, adapters)
  if os.path.isfile(results_path):
    with open(results_path) as f:
      previous = json.load(f)
    if previous.get('eval_key') == key:
      _progress('eval: same config and adapters as eval/results.json; reusing it')
      return dict(previous, reused=True)
  # Imported only when sampling: a rerun that reuses the results stays instant.
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from toy import metrics as toy_metrics  # pylint: disable=g-import-not-at-top
  from toy import plots as toy_plots  # pylint: disable=g-import-not-at-top
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  from realcustom_jax import schedules  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top

  res = int(config.resolution)
  cases = toy_world.eval_cases(res, int(config.toy.prompts_per_subject))
  refs = [toy_world.render(c.subject, res)[0] for c in cases]
  s = config.sampler
  pipes = {k: _pipeline(config, sd_dir, vision_dir, v, k) for k, v in adapters.items()}
  any_pipe = pipes['adaptive']
  schedule = schedules.ddim_schedule(any_pipe.components.scheduler_config, int(s.num_steps))
  conditions = any_pipe.encode([Image.fromarray(r) for r in refs], [c.prompt for c in cases],
                               [c.word for c in cases])
  seeds = tuple(int(x) for x in config.toy.seeds)

  rows, images, scopes = {}, {}, {}
  for v in variants(config):
    pipe = pipes[v.scoring or 'adaptive']
    rows[v.name], images[v.name], scopes[v.name] = [], [], []
    t0 = time.perf_counter()
    for seed in seeds:
      latents = pipe.initial_latents(seed, len(cases)) * schedule.init_noise_sigma
      # The paper's w_t, w_i and gamma_num (config.sampler); the variant's scope.
      settings = sampler.GuidanceSettings.from_config(s, gamma_scope=v.gamma_scope,
                                                      binary_mask=v.binary)
      if not v.scoring:
        out = sampler.cfg_sample(pipe.model, pipe.params, schedule, latents, conditions,
                                 settings)
        scope = None
      else:
        out = sampler.sample(pipe.model, pipe.params, schedule, latents, conditions, settings)
        scope = np.asarray(jax.device_get(out.mask))
      generated = pipe.decode(out.latents)
      for i, case in enumerate(cases):
        rows[v.name].append(toy_metrics.score_image(
            generated[i], case.background, refs[i], case.subject.identity,
            None if scope is None else scope[i]))
      images[v.name].append(generated)
      scopes[v.name].append(scope)
    _progress(f'eval {v.name}: {time.perf_counter() - t0:.1f}s')

  summary = {name: dict(toy_metrics.summarize(r), **_variant_info(v))
             for v in variants(config) for name, r in [(v.name, rows[v.name])]}
  result = {'eval_key': key, 'variants': summary, 'seeds': list(seeds), 'cases': len(cases),
            'subjects': len(toy_world.HELD_OUT), 'sampler_steps': int(s.num_steps),
            'guidance_text': float(s.guidance_text), 'guidance_image': float(s.guidance_image),
            'gamma_num': float(s.gamma_num)}
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  toy_plots.tradeoff_plot(summary, os.path.join(out_dir, 'tradeoff.png'))
  toy_plots.sample_grid(
      cases, refs, {k: images[k][0] for k in ('plain_t2i', 'no_mask', 'realcustom')},
      scopes['realcustom'][0], os.path.join(out_dir, 'samples.png'))
  return result


def _eval_key(config, adapters: dict[str, str]) -> str:
  """Changes when the config or an adapter file does: then the evaluation reruns."""
  h = hashlib.sha256(config.to_json(sort_keys=True).encode())
  for name in sorted(adapters):
    with open(adapters[name], 'rb') as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _variant_info(v: Variant) -> dict:
  return {'scoring': v.scoring or '-', 'gamma_scope': v.gamma_scope if v.scoring else None,
          'scope': v.scope}


def format_table(result: dict) -> str:
  """The results as a Markdown table (mean ± standard error over the samples)."""
  head = ('| variant | scoring | scope | gamma_scope | n | text control (bg acc) | '
          'bg_frac | subject sim | identity acc | scope on object |')
  lines = [head, '|' + '---|' * 10]
  for name, r in result['variants'].items():
    pm = lambda k: f'{r[k]:.3f} ± {r[k + "_se"]:.3f}' if k in r else '-'
    g = '-' if r['gamma_scope'] is None else f'{r["gamma_scope"]:g}'
    lines.append(f'| {name} | {r["scoring"]} | {r["scope"]} | {g} | {r["n"]} | {pm("text")} | '
                 f'{pm("bg_frac")} | {pm("sim")} | {pm("id")} | {pm("scope_in_object")} |')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------


def check_config(config) -> None:
  """ValueError (one line) for `config.toy` values no stage could run with."""
  toy = config.toy
  for key in ('num_train_images', 'vae_steps', 'vae_batch', 'unet_steps', 'unet_batch',
              'checkpoint_every'):
    if int(toy[key]) <= 0:
      raise ValueError(f'config.toy.{key} must be positive, got {toy[key]}')
  if not toy.seeds:
    raise ValueError('config.toy.seeds is empty')
  if not all(0.0 <= float(g) <= 1.0 for g in toy.gamma_scopes):
    raise ValueError(f'config.toy.gamma_scopes must lie in [0, 1], got {tuple(toy.gamma_scopes)}')
  if not 0.0 <= float(toy.caption_dropout) < 1.0:
    raise ValueError(f'config.toy.caption_dropout must lie in [0, 1), got {toy.caption_dropout}')
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  toy_world.eval_cases(int(config.resolution), int(toy.prompts_per_subject))  # checks the count


def run(config, workdir: str) -> dict:
  """All stages; returns the evaluation result plus stage wall times."""
  times, t_all = {}, time.perf_counter()
  t0 = time.perf_counter()
  shards = stage_world(config, workdir)
  times['world_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  sd_dir, vision_dir = stage_base(config, workdir)
  times['base_s'] = time.perf_counter() - t0
  adapters = {}
  scorings = SCORINGS if config.toy.train_none_scoring else SCORINGS[:1]
  for scoring in scorings:
    t0 = time.perf_counter()
    adapters[scoring] = stage_adapter(config, workdir, scoring, sd_dir, vision_dir, shards)
    times[f'adapter_{scoring}_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  result = stage_eval(config, workdir, sd_dir, vision_dir, adapters)
  times['eval_s'] = time.perf_counter() - t0
  times['total_s'] = time.perf_counter() - t_all
  # This invocation's stage times; a rerun that reuses everything keeps the file's
  # times of the run that did the work.
  if not result.pop('reused', False):
    result['wall_s'] = {k: round(v, 1) for k, v in times.items()}
    with open(os.path.join(workdir, 'eval', 'results.json'), 'w') as f:
      json.dump(result, f, indent=2)
  result['this_run_wall_s'] = {k: round(v, 1) for k, v in times.items()}
  return result


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  from configs import toy_world as toy_config  # pylint: disable=g-import-not-at-top
  config = FLAGS.config or toy_config.get_config('smoke' if FLAGS.smoke else '')
  try:
    check_config(config)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  workdir = os.path.abspath(FLAGS.workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    if not os.access(workdir, os.W_OK):
      raise OSError('not writable')
  except OSError as e:
    print(f'error: cannot use --workdir {FLAGS.workdir}: {e}', file=sys.stderr)
    sys.exit(2)
  cli.quiet_libraries()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropOrbaxInfo())
  try:
    result = run(config, workdir)
  except RuntimeError as e:  # a train.main / export subprocess failed; its log is named
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  print(format_table(result))
  print(f'samples per variant: {result["cases"]} cases ({result["subjects"]} held-out '
        f'subjects) x seeds {result["seeds"]}; wall time {result["wall_s"]["total_s"]:.0f}s '
        f'(this run {result["this_run_wall_s"]["total_s"]:.0f}s); '
        f'plot {os.path.join(workdir, "eval", "tradeoff.png")}')
  print(json.dumps({'benchmark': 'toy_reproduction', **result}), flush=True)


if __name__ == '__main__':
  app.run(main)
