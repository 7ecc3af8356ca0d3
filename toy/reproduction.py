"""Reproduces RealCustom's dual optimum at toy scale on a CPU, from scratch.

  python -m toy.reproduction --workdir=/tmp/toy_repro            # every stage
  python -m toy.reproduction --workdir=/tmp/toy_b --base=shipped  # on the shipped base
  python -m toy.reproduction --workdir=/tmp/toy_smoke --smoke    # a few steps

Stages, each skipped or resumed when its output is already in --workdir:

1. world/      the toy world's training shards (toy/world.py).
2. base/       autoencoder, UNet and text encoder trained from scratch, saved as a
               diffusers SD directory base/sd plus a CLIP vision directory base/vision
               (toy/base.py); with --base=shipped, toy/shipped/'s base written out instead.
2b. encoder/   with --config.toy.subject_encoder=contrastive (the default; 'random'
               keeps base/vision): a CLIP-like subject encoder trained against the
               base's text encoder (toy/encoder.py; with --base=shipped the shipped one
               when its config matches), its gate (held-out caption retrieval,
               identity-colour and object probes) in encoder/gate.json; the adapters
               then read it instead of base/vision.
3. adapter_NAME/seedS/  the RealCustom adapters, trained by `python -m train.main` on
               the frozen base: every recipe of config.toy.adapters (toy/variants.py:
               'adaptive' the paper, 'none' Table 3 ID-2, 'adaptive_wordmap_narrow' the
               shipped recipe, and the other options of issue 27)
               at every training seed of config.toy.adapter_seeds; exported to
               adapter.safetensors. A change of the model code or of the effective
               training config (a stamp is stored) retrains. `--train_only` stops here.
4. eval/       every row on the same held-out subjects, prompts and noise seeds, each
               trained adapter at each training seed (toy/evaluation.py): plain T2I
               with the real word and with the naming caption (G0), RealCustom without
               mask at several w_i, at the paper's settings, the gamma_scope and
               gamma_num sweeps, binary scope, the fusion swaps, no scoring, Gate A's
               fixed selections and selection precision (toy/selection_gate.py); G1's
               visual-path checks; Textual Inversion and DreamBooth per subject at
               several step counts (toy/baselines.py); G2's copy errors. Writes
               results.json, tradeoff.png (text control vs identity accuracy),
               tradeoff_sim.png (vs subject similarity) and samples.png, prints the
               table and the gates G0-G3 and GA (toy/gates.py).

The last line printed is a JSON summary. Config: configs/toy_world.py (`--config.*`
overrides work; `--smoke` uses its 'smoke' sizes).
"""
import ast
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
from toy import selection_gate
from toy.variants import ADAPTER_RUNS
from toy.variants import SUBJECT_ENCODERS
from toy.variants import is_scored
from toy.variants import adapter_runs
from toy.variants import adapter_seeds
from toy.variants import uses_stored_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, 'configs', 'toy_world.py')

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so tests import this module beside other
  entry points (train.export) that define --workdir in the same process."""
  flags.DEFINE_string('workdir', None, 'Directory for every stage (created; reruns resume).')
  flags.DEFINE_bool('smoke', False, 'A few steps per stage: checks the wiring, not the method.')
  flags.DEFINE_enum('base', 'train', ['train', 'shipped'],
                    "'train': world, autoencoder and base from scratch; 'shipped': the base "
                    'model shipped in toy/shipped/ (adapters, baselines and evaluation only).')
  flags.DEFINE_bool('train_only', False,
                    'Stop after the adapters are trained (all seeds); a later run without '
                    'it evaluates them.')
  config_flags.DEFINE_config_file('config', None,
                                  'Config file (default configs/toy_world.py).',
                                  lock_config=False)
  flags.mark_flags_as_required(['workdir'])

# Sources whose change invalidates a trained adapter (and so retrains it).
_MODEL_SOURCES = ('model.py', 'projectors.py', 'scoring.py', 'unet.py', 'attention.py',
                  'kernels.py', 'adapter.py', 'selection.py', 'schedules.py',
                  'adapter_training.py')


def _progress(message: str) -> None:
  """Stage progress on stderr (stdout ends with the table and the JSON line)."""
  print(f'[toy_reproduction] {message}', file=sys.stderr, flush=True)


class _DropOrbaxInfo(std_logging.Filter):
  """orbax logs several INFO lines per checkpoint; they drown the stage progress."""

  def filter(self, record):
    return record.levelno > std_logging.INFO or '/orbax/' not in record.pathname


# ---------------------------------------------------------------------------------
# Stages 1-2: world and base model
# ---------------------------------------------------------------------------------


def stage_world(config, workdir: str) -> dict[bool, str]:
  """The world's shards: {False: plain, True: with re-rendered references} (the second
  only when an adapter run reads stored references)."""
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  out = {}
  wanted = {False} | {uses_stored_reference(o) for o in adapter_runs(config).values()}
  for with_reference in sorted(wanted):
    shards = os.path.join(workdir, 'world', 'shards_ref' if with_reference else 'shards')
    if not os.path.isdir(shards):
      toy_world.write_world_shards(shards, int(config.toy.num_train_images),
                                   int(config.resolution), seed=config.seed,
                                   with_reference=with_reference)
    out[with_reference] = shards
  return out


def stage_base(config, workdir: str, source: str = 'train') -> tuple[str, str]:
  """Trains (or resumes, or skips) the autoencoder and the UNet, or with source 'shipped'
  writes out the shipped base (toy/shipped/); returns (sd, vision) dirs."""
  base = os.path.join(workdir, 'base')
  sd_dir, vision_dir = os.path.join(base, 'sd'), os.path.join(base, 'vision')
  if source == 'shipped':
    from toy import shipped  # pylint: disable=g-import-not-at-top
    dest = os.path.join(workdir, 'shipped_base')
    sd_dir, _, _ = shipped.materialise(dest)
    return sd_dir, os.path.join(dest, 'vision')  # the base's random tower
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
  from realcustom_jax import encoders  # pylint: disable=g-import-not-at-top
  tokenizer = toy_base.build_tokenizer(int(config.toy.text_length))
  text_encoder, text_params = toy_base.build_text_encoder(config, tokenizer)
  scenes = list(toy_world.iter_scenes(int(config.toy.num_train_images),
                                      int(config.resolution), config.seed))
  masks = np.stack([toy_world.render(sc, int(config.resolution))[1] for sc in scenes])
  named = [sc.named_caption for sc in scenes]
  unet_params, text_params = toy_base.train_base(
      config, raw * scaling, masks, encoders.tokenize(tokenizer, named),
      encoders.tokenize(tokenizer, captions), toy_base.role_weights(tokenizer, named),
      toy_base.role_weights(tokenizer, captions), encoders.tokenize(tokenizer, [''])[0],
      text_encoder, text_params, base)
  _progress(f'unet: {time.perf_counter() - t0:.0f}s')
  with open(os.path.join(base, 'base_stats.json'), 'w') as f:
    json.dump({'vae_palette_accuracy': pixel_acc, 'latent_scaling': scaling}, f)
  # model_index.json is written last: its presence marks a complete base model.
  return toy_base.save_pretrained(os.path.join(base), config, unet_params, vae_params,
                                  scaling, text_params, tokenizer)


# ---------------------------------------------------------------------------------
# Stage 3: adapters through train.main
# ---------------------------------------------------------------------------------


def _code_without_docs(source: str) -> str:
  """The syntax tree of `source` without docstrings (comments are not in it): what runs."""
  tree = ast.parse(source)
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
          and isinstance(body[0].value.value, str)):
        node.body = body[1:] or [ast.Pass()]
  return ast.dump(tree)


def model_fingerprint() -> str:
  """A hash of the model code's syntax; a docstring or comment edit keeps the adapters."""
  h = hashlib.sha256()
  for name in _MODEL_SOURCES:
    with open(os.path.join(ROOT, 'realcustom_jax', name)) as f:
      h.update(_code_without_docs(f.read()).encode())
  return h.hexdigest()[:16]


# Keys that do not change the trained adapter: where the data lives, how often the run
# logs and checkpoints, what it does with a damaged checkpoint.
_DATA_PATH_KEYS = ('shards_dir', 'tfds_data_dir')
_BOOKKEEPING_TRAIN_KEYS = ('checkpoint_every', 'log_every', 'max_to_keep',
                           'on_damaged_checkpoint', 'debug_nan_step')
# Read only with config.train.score_supervision on (added after the first adapters).
_SCORE_SUPERVISION_KEYS = ('score_supervision', 'score_supervision_weight', 'subject_words')


def effective_config(config, overrides: dict[str, str], seed: int):
  """The config one adapter run trains with: `overrides` applied, the seed set."""
  c = config.copy_and_resolve_references()
  c.update_from_flattened_dict(dict(overrides))
  c.seed = seed
  c.data.shuffle_seed = seed
  return c


def adapter_stamp(config, overrides: dict[str, str], seed: int) -> dict:
  """What a trained adapter depends on: the model code and the effective training
  config (so a recipe keeps its adapters when the defaults it overrides change)."""
  c = effective_config(config, overrides, seed)
  data = {k: v for k, v in c.data.to_dict().items() if k not in _DATA_PATH_KEYS}
  train_keys = {k: v for k, v in c.train.to_dict().items()
                if k not in _BOOKKEEPING_TRAIN_KEYS}
  if train_keys.get('score_supervision', 'none') == 'none':  # its keys are inert then
    for key in _SCORE_SUPERVISION_KEYS:
      train_keys.pop(key, None)
  train = hashlib.sha256(json.dumps(
      {'train': train_keys, 'model': c.model.to_dict(), 'data': data,
       'seed': seed}, sort_keys=True, default=str).encode()).hexdigest()[:16]
  stamp = {'model_code': model_fingerprint(), 'num_steps': int(c.train.num_steps),
           'train_config': train}
  if c.toy.subject_encoder != 'random':  # the random tower's adapters keep their stamps
    stamp['subject_encoder'] = encoder_stamp(c)['hash']
  return stamp


def encoder_stamp(config) -> dict:
  """What a trained subject encoder depends on (its section, the world's seed and size)."""
  what = {'encoder': config.toy.encoder.to_dict(), 'seed': int(config.seed),
          'num_train_images': int(config.toy.num_train_images)}
  digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
  return {'hash': digest.hexdigest()[:16], **what}


def _stamp_of(vision_dir: str) -> dict | None:
  path = os.path.join(vision_dir, 'encoder_stamp.json')
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def stage_encoder(config, workdir: str, sd_dir: str, random_vision_dir: str) -> tuple[str, dict]:
  """Trains (or resumes, or skips) the contrastive subject encoder and runs its gate;
  returns (its vision dir, the gate). A changed encoder section retrains it."""
  from toy import encoder as toy_encoder  # pylint: disable=g-import-not-at-top
  edir = os.path.join(workdir, 'encoder')
  vision_dir, gate_path = os.path.join(edir, 'vision'), os.path.join(edir, 'gate.json')
  stamp = encoder_stamp(config)
  stamp_path = os.path.join(vision_dir, 'encoder_stamp.json')
  if _stamp_of(vision_dir) not in (None, stamp):
    _progress('encoder: its config changed: retraining')
    shutil.rmtree(edir)
  shipped_encoder = os.path.join(os.path.dirname(sd_dir), 'encoder')  # with --base=shipped
  if not os.path.isfile(stamp_path) and _stamp_of(shipped_encoder) == stamp:
    shutil.copytree(shipped_encoder, vision_dir)
    _progress('encoder: the shipped one (same config)')
  if not os.path.isfile(stamp_path):
    t0 = time.perf_counter()
    _, params = toy_encoder.train(config, sd_dir, edir)
    toy_encoder.save(vision_dir, config, params, stamp)
    _progress(f'encoder: trained in {time.perf_counter() - t0:.0f}s')
  if not os.path.isfile(gate_path):
    gate = toy_encoder.gate(config, sd_dir, vision_dir, random_vision_dir)
    with open(gate_path, 'w') as f:
      json.dump(gate, f, indent=2)
  with open(gate_path) as f:
    gate = json.load(f)
  c, r = gate['contrastive'], gate['random']
  _progress(f'GE {"passes" if gate["passes"] else "FAILS"}: held-out caption retrieval '
            f'{c["retrieval"]:.3f} (chance {gate["retrieval_chance"]:.3f}); identity probe '
            f'body / accent {c["body_accuracy"]:.3f} / {c["accent_accuracy"]:.3f} (random '
            f'tower {r["body_accuracy"]:.3f} / {r["accent_accuracy"]:.3f}); object probe '
            f'{c["object_probe"]["accuracy"]:.3f} (random tower '
            f'{r["object_probe"]["accuracy"]:.3f})')
  return vision_dir, gate


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


def stage_adapter(config, workdir: str, name: str, seed: int, overrides: dict[str, str],
                  sd_dir: str, vision_dir: str, shards: str) -> str:
  """Trains one adapter with `python -m train.main` and exports it; returns the file.

  `overrides` ({'model.scoring': 'none'}, ...) are passed as --config.* flags; `seed`
  is the training seed (initialisation, noise, timesteps and data order).
  """
  adir = os.path.join(workdir, f'adapter_{name}', f'seed{seed}')
  out = os.path.join(adir, 'adapter.safetensors')
  stamp_path = os.path.join(adir, 'fingerprint.json')
  stamp = adapter_stamp(config, overrides, seed)
  if os.path.isdir(adir):
    old = json.load(open(stamp_path)) if os.path.isfile(stamp_path) else None
    if old != stamp:
      _progress(f'adapter_{name}: model code or training config changed ({old} -> '
                f'{stamp}): retraining')
      shutil.rmtree(adir)
  if os.path.isfile(out):
    return out
  os.makedirs(adir, exist_ok=True)
  with open(stamp_path, 'w') as f:
    json.dump(stamp, f)
  cmd = [sys.executable, '-m', 'train.main', f'--config={CONFIG_FILE}',
         f'--workdir={os.path.join(adir, "workdir")}',
         f'--config.pretrained={sd_dir}', f'--config.vision_encoder={vision_dir}',
         f'--config.seed={seed}', f'--config.data.shuffle_seed={seed}',
         # One prepared ArrayRecord set for both adapters.
         f'--config.data.tfds_data_dir={os.path.join(workdir, "world", "tfds")}',
         f'--config.data.shards_dir={shards}'] + [
             f for f in _override_flags(config)
             if not f.startswith(('--config.data.shards_dir', '--config.data.tfds_data_dir',
                                  '--config.data.shuffle_seed')
                                 + tuple(f'--config.{k}=' for k in overrides))] + [
             f'--config.{k}={v}' for k, v in overrides.items()]
  t0 = time.perf_counter()
  what = f'adapter_{name} seed {seed}'
  _run_logged(cmd, os.path.join(adir, 'train.log'), f'{what}: train.main')
  _run_logged([sys.executable, '-m', 'train.export', f'--workdir={os.path.join(adir, "workdir")}',
               f'--out={out}'], os.path.join(adir, 'export.log'), f'{what}: export')
  _progress(f'adapter_{name} seed {seed}: trained and exported in '
            f'{time.perf_counter() - t0:.0f}s')
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
# main
# ---------------------------------------------------------------------------------


def check_config(config) -> None:
  """ValueError (one line) for `config.toy` values no stage could run with."""
  toy = config.toy
  for key in ('num_train_images', 'vae_steps', 'vae_batch', 'unet_steps', 'unet_batch',
              'checkpoint_every', 'baseline_batch', 'copy_gate_images', 'text_length',
              'probe_images'):
    if int(toy[key]) <= 0:
      raise ValueError(f'config.toy.{key} must be positive, got {toy[key]}')
  if not toy.seeds:
    raise ValueError('config.toy.seeds is empty')
  if toy.subject_encoder not in SUBJECT_ENCODERS:
    raise ValueError(f'config.toy.subject_encoder must be one of {SUBJECT_ENCODERS}, got '
                     f'{toy.subject_encoder!r}')
  vision = dict(toy.encoder.vision)
  if int(config.resolution) % int(vision['patch_size']) or int(vision['image_size']) != int(
      config.resolution):
    raise ValueError(f'config.toy.encoder.vision: image_size {vision["image_size"]} must be '
                     f'the resolution {config.resolution} and a multiple of patch_size '
                     f'{vision["patch_size"]}')
  for key in ('steps', 'batch', 'embed_dim'):
    if int(toy.encoder[key]) <= 0:
      raise ValueError(f'config.toy.encoder.{key} must be positive, got {toy.encoder[key]}')
  unknown = [a for a in toy.adapters if a not in ADAPTER_RUNS]
  if unknown or not toy.adapters:
    raise ValueError(f'config.toy.adapters must name some of {tuple(ADAPTER_RUNS)}, got '
                     f'{tuple(toy.adapters)}')
  seeds = tuple(toy.adapter_seeds)
  if not seeds or len(set(seeds)) != len(seeds) or any(int(x) < 0 for x in seeds):
    raise ValueError(f'config.toy.adapter_seeds must be distinct seeds >= 0, got {seeds}')
  if toy.main_adapter not in toy.adapters or not is_scored(toy.main_adapter):
    raise ValueError(f'config.toy.main_adapter must be a scored adapter of '
                     f'config.toy.adapters, got {toy.main_adapter!r}')
  if not set(toy.gate_a_adapters) <= set(toy.adapters) or not all(
      is_scored(a) for a in toy.gate_a_adapters):
    raise ValueError(f'config.toy.gate_a_adapters must be scored adapters of '
                     f'config.toy.adapters, got {tuple(toy.gate_a_adapters)}')
  for spec in toy.fixed_selections:
    kind, _, ratio = str(spec).partition(':')
    try:
      ok = kind in selection_gate.PRIORITIES and 0.0 < float(ratio) <= 1.0
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f'config.toy.fixed_selections: {spec!r} is not \'KIND:GAMMA_NUM\' '
                       f'with KIND in {selection_gate.PRIORITIES} and 0 < GAMMA_NUM <= 1')
  if not all(0.0 < float(g) <= 1.0 for g in toy.gamma_nums):
    raise ValueError(f'config.toy.gamma_nums must lie in (0, 1], got {tuple(toy.gamma_nums)}')
  if not all(0.0 <= float(g) <= 1.0 for g in toy.gamma_scopes):
    raise ValueError(f'config.toy.gamma_scopes must lie in [0, 1], got {tuple(toy.gamma_scopes)}')
  for key in ('ti_checkpoints', 'db_checkpoints'):
    steps = tuple(int(x) for x in toy[key])
    if any(x <= 0 for x in steps) or list(steps) != sorted(set(steps)):
      raise ValueError(f'config.toy.{key} must be positive and ascending, got {steps}')
  if not 0.0 <= float(toy.named_fraction) <= 1.0:
    raise ValueError(f'config.toy.named_fraction must lie in [0, 1], got {toy.named_fraction}')
  from realcustom_jax import scoring  # pylint: disable=g-import-not-at-top
  bad = [f for f in toy.fusions if f not in scoring.FUSIONS]
  if bad:
    raise ValueError(f'config.toy.fusions: {bad} not among {scoring.FUSIONS}')
  if not 0.0 <= float(toy.caption_dropout) < 1.0:
    raise ValueError(f'config.toy.caption_dropout must lie in [0, 1), got {toy.caption_dropout}')
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  toy_world.eval_cases(int(config.resolution), int(toy.prompts_per_subject))  # checks the count


def run(config, workdir: str, base: str = 'train', train_only: bool = False) -> dict:
  """All stages; returns the evaluation result plus stage wall times."""
  times, t_all = {}, time.perf_counter()
  t0 = time.perf_counter()
  shards = stage_world(config, workdir)
  times['world_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  sd_dir, vision_dir = stage_base(config, workdir, base)
  times['base_s'] = time.perf_counter() - t0
  encoder_gate = None
  if config.toy.subject_encoder == 'contrastive':
    t0 = time.perf_counter()
    vision_dir, encoder_gate = stage_encoder(config, workdir, sd_dir, vision_dir)
    times['encoder_s'] = time.perf_counter() - t0
  # {(name, seed): adapter file}; seed by seed, so an interrupted run has every
  # variant at its first seeds.
  adapters = {}
  for seed in adapter_seeds(config):
    for name, overrides in adapter_runs(config).items():
      t0 = time.perf_counter()
      adapters[name, seed] = stage_adapter(
          config, workdir, name, seed, overrides, sd_dir, vision_dir,
          shards[uses_stored_reference(overrides)])
      times[f'adapter_{name}_s'] = times.get(f'adapter_{name}_s', 0.0) + (
          time.perf_counter() - t0)
  if train_only:
    times['total_s'] = time.perf_counter() - t_all
    return {'adapters': {f'{n}/seed{s}': p for (n, s), p in adapters.items()},
            'this_run_wall_s': {k: round(v, 1) for k, v in times.items()}}
  t0 = time.perf_counter()
  from toy import evaluation  # pylint: disable=g-import-not-at-top
  result = evaluation.stage_eval(config, workdir, sd_dir, vision_dir, adapters)
  times['eval_s'] = time.perf_counter() - t0
  if encoder_gate is not None:
    result['encoder_gate'] = encoder_gate
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
  if FLAGS.base == 'shipped':
    from toy import shipped  # pylint: disable=g-import-not-at-top
    try:
      shipped.check()
    except ValueError as e:  # a missing or changed shipped model
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  try:
    result = run(config, workdir, FLAGS.base, FLAGS.train_only)
  except RuntimeError as e:  # a train.main / export subprocess failed; its log is named
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  if FLAGS.train_only:
    print(json.dumps({'benchmark': 'toy_reproduction_train', **result}), flush=True)
    return
  from toy import evaluation  # pylint: disable=g-import-not-at-top
  print(evaluation.format_table(result))
  print(f'samples per variant: {result["cases"]} cases ({result["subjects"]} held-out '
        f'subjects) x seeds {result["seeds"]}; wall time {result["wall_s"]["total_s"]:.0f}s '
        f'(this run {result["this_run_wall_s"]["total_s"]:.0f}s); '
        f'plot {os.path.join(workdir, "eval", "tradeoff.png")}')
  print(json.dumps({'benchmark': 'toy_reproduction', **result}), flush=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
