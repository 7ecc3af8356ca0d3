"""Reproduces RealCustom's dual optimum at toy scale on a CPU, from scratch.

  python -m toy.reproduction --workdir=/tmp/toy_repro            # every stage
  python -m toy.reproduction --workdir=/tmp/toy_b --base=shipped  # on the shipped base
  python -m toy.reproduction --workdir=/tmp/toy_smoke --smoke    # a few steps

Stages, each skipped or resumed when its output is already in --workdir:

1. world/      the toy world's training shards (toy/world.py).
2. base/       autoencoder, UNet and text encoder trained from scratch, saved as a
               diffusers SD directory base/sd plus a CLIP vision directory base/vision
               (toy/base.py); with --base=shipped, toy/shipped/'s base written out instead.
3. adapter_*/  the RealCustom adapter, trained by `python -m train.main` on the frozen
               base (subject = the training image, gamma_num ~ U[0.3, 1], image dropout):
               'adaptive' (the paper), 'none' (model.scoring='none', Table 3 ID-2) and
               'copy_text' (visual K/V started as copies of the text K/V, G2); exported
               to adapter_*/adapter.safetensors. A change of the model code (its
               fingerprint is stored) retrains.
4. eval/       every variant on the same held-out subjects, prompts and seeds: plain T2I
               with the real word and with the naming caption (G0), RealCustom without
               mask at several w_i, with adaptive mask guidance (Sec. 4.1 settings), the
               gamma_scope sweep, binary scope, the fusion ablations, no scoring; G1's
               visual-path checks; Textual Inversion and DreamBooth per subject at
               several step counts (toy/baselines.py); G2's copy errors. Writes
               results.json, tradeoff.png (text control vs identity accuracy),
               tradeoff_sim.png (vs subject similarity) and samples.png, prints the
               table and the gates G0-G3 (toy/gates.py).

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
flags.DEFINE_enum('base', 'train', ['train', 'shipped'],
                  "'train': world, autoencoder and base from scratch; 'shipped': the base "
                  'model shipped in toy/shipped/ (adapters, baselines and evaluation only).')
config_flags.DEFINE_config_file('config', None, 'Config file (default configs/toy_world.py).',
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


@dataclasses.dataclass(frozen=True)
class Variant:
  """One inference setting of the comparison.

  Attributes:
    name: its key in the results.
    adapter: which trained adapter ('adaptive', 'none', 'copy_text'); '' = plain T2I.
    gamma_scope: Eq. 11's ratio.
    binary: binary scope (top-k ones) instead of the soft scope.
    prompt: 'plain' (the real word only) or 'named' (the caption naming the identity).
    guidance_image: w_i, or None for the config's.
    fusion: the score fusion at inference (Table 3 IDs 3-5), or None for the config's.
  """
  name: str
  adapter: str = 'adaptive'
  gamma_scope: float = 0.25
  binary: bool = False
  prompt: str = 'plain'
  guidance_image: float | None = None
  fusion: str | None = None

  @property
  def scope(self) -> str:
    if not self.adapter:
      return '-'
    if self.binary and self.gamma_scope >= 1.0:
      return 'all ones'
    return 'binary' if self.binary else 'soft'

  @property
  def pipe(self) -> str:
    """The pipeline it samples with: its adapter, and the fusion it scores with."""
    return f'{self.adapter or "adaptive"}' + (f'/{self.fusion}' if self.fusion else '')


def variants(config) -> list[Variant]:
  """Plain T2I (real word, naming caption), no mask at several w_i, the paper's setting,
  the gamma sweep, binary, the fusion ablations, no scoring, the copied K/V start."""
  toy = config.toy
  out = [Variant('plain_t2i', adapter=''),
         Variant('named_prompt', adapter='', prompt='named'),
         # Binary top-k at gamma 1 keeps every position: the scope is all ones, so Eq. 12
         # gates nothing and z_t is not masked: RealCustom without mask guidance.
         Variant('no_mask', gamma_scope=1.0, binary=True),
         Variant('realcustom', gamma_scope=0.25)]
  out += [Variant(f'no_mask_wi_{w:g}', gamma_scope=1.0, binary=True, guidance_image=float(w))
          for w in toy.no_mask_guidance_images]
  out += [Variant(f'gamma_{g:g}', gamma_scope=float(g))
          for g in toy.gamma_scopes if abs(g - 0.25) > 1e-9]
  out.append(Variant('binary_0.25', gamma_scope=0.25, binary=True))
  out += [Variant(f'fusion_{f}', fusion=f) for f in toy.fusions]
  if toy.train_none_scoring:
    out += [Variant('no_scoring', adapter='none', gamma_scope=0.25),
            Variant('no_scoring_no_mask', adapter='none', gamma_scope=1.0, binary=True)]
  if toy.compare_kv_init:
    out.append(Variant('copy_text_kv', adapter='copy_text', gamma_scope=0.25))
  return out


def adapter_runs(config) -> dict[str, dict[str, str]]:
  """The adapters to train: name -> config overrides."""
  runs = {'adaptive': {}}
  if config.toy.train_none_scoring:
    runs['none'] = {'model.scoring': 'none'}
  if config.toy.compare_kv_init:
    runs['copy_text'] = {'train.visual_kv_init': 'copy_text'}
  return runs


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


def stage_base(config, workdir: str, source: str = 'train') -> tuple[str, str]:
  """Trains (or resumes, or skips) the autoencoder and the UNet, or with source 'shipped'
  writes out the shipped base (toy/shipped/); returns (sd, vision) dirs."""
  base = os.path.join(workdir, 'base')
  sd_dir, vision_dir = os.path.join(base, 'sd'), os.path.join(base, 'vision')
  if source == 'shipped':
    from toy import shipped  # pylint: disable=g-import-not-at-top
    sd_dir, vision_dir, _ = shipped.materialise(os.path.join(workdir, 'shipped_base'))
    return sd_dir, vision_dir
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


def stage_adapter(config, workdir: str, name: str, overrides: dict[str, str], sd_dir: str,
                  vision_dir: str, shards: str) -> str:
  """Trains one adapter with `python -m train.main` and exports it; returns the file.

  `overrides` ({'model.scoring': 'none'}, ...) are passed as --config.* flags.
  """
  adir = os.path.join(workdir, f'adapter_{name}')
  out = os.path.join(adir, 'adapter.safetensors')
  stamp_path = os.path.join(adir, 'fingerprint.json')
  train = hashlib.sha256(json.dumps(
      {'train': config.train.to_dict(), 'model': config.model.to_dict(),
       'overrides': overrides}, sort_keys=True,
      default=str).encode()).hexdigest()[:16]
  stamp = {'model_code': model_fingerprint(), 'num_steps': int(config.train.num_steps),
           'train_config': train}
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
         f'--config.seed={config.seed}',
         # One prepared ArrayRecord set for both adapters.
         f'--config.data.tfds_data_dir={os.path.join(workdir, "world", "tfds")}',
         f'--config.data.shards_dir={shards}'] + [
             f for f in _override_flags(config)
             if not f.startswith(('--config.data.shards_dir', '--config.data.tfds_data_dir')
                                 + tuple(f'--config.{k}=' for k in overrides))] + [
             f'--config.{k}={v}' for k, v in overrides.items()]
  t0 = time.perf_counter()
  _run_logged(cmd, os.path.join(adir, 'train.log'), f'adapter_{name}: train.main')
  _run_logged([sys.executable, '-m', 'train.export', f'--workdir={os.path.join(adir, "workdir")}',
               f'--out={out}'], os.path.join(adir, 'export.log'), f'adapter_{name}: export')
  _progress(f'adapter_{name}: trained and exported in {time.perf_counter() - t0:.0f}s')
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


def _pipeline(config, sd_dir, vision_dir, adapter, overrides: dict[str, str]):
  from realcustom_jax.pipeline import RealCustomPipeline  # pylint: disable=g-import-not-at-top
  c = config.copy_and_resolve_references()
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  return RealCustomPipeline.from_pretrained(sd_dir, vision_dir, adapter, c)


def _pipelines(config, sd_dir, vision_dir, adapters) -> dict:
  """One pipeline per (adapter, inference fusion) the variants use.

  A fusion ablation samples the adapter trained with Eq. 8's fusion through a model
  that fuses the scores otherwise (same parameter tree). The pipeline refuses such a
  mismatch from a user's config, so the ablation swaps the model of a loaded pipeline.
  """
  import copy  # pylint: disable=g-import-not-at-top
  from realcustom_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  runs = adapter_runs(config)
  pipes = {}
  for v in variants(config):
    name = v.adapter or 'adaptive'
    if name not in pipes:
      pipes[name] = _pipeline(config, sd_dir, vision_dir, adapters[name], dict(runs[name]))
    if v.pipe not in pipes:
      ablation = config.copy_and_resolve_references()
      ablation.model.fusion = v.fusion
      pipe = copy.copy(pipes[name])
      pipe.model = model_lib.build_model(ablation, pipe.components.unet_config)
      pipes[v.pipe] = pipe
  return pipes


def _subject_groups(cases) -> list[list[int]]:
  """Case indices grouped by subject (eval_cases lists each subject's cases together)."""
  groups, last = [], None
  for i, c in enumerate(cases):
    if c.subject != last:
      groups.append([])
      last = c.subject
    groups[-1].append(i)
  return groups


def pseudo_word_prompt(case_or_scene, background: str) -> str:
  """ "a sks circle on a green background": the pseudo-word before the real word."""
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top
  shape = case_or_scene.shape
  return (f'a sks {shape} on {toy_world.article(background)} {background} background')


def stage_eval(config, workdir: str, sd_dir: str, vision_dir: str,
               adapters: dict[str, str]) -> dict:
  """Samples every variant and baseline on the same cases and seeds; scores them, checks
  the gates, plots, writes results."""
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
  from realcustom_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  from realcustom_jax import schedules  # pylint: disable=g-import-not-at-top
  from toy import gates  # pylint: disable=g-import-not-at-top
  from toy import metrics as toy_metrics  # pylint: disable=g-import-not-at-top
  from toy import plots as toy_plots  # pylint: disable=g-import-not-at-top
  from toy import world as toy_world  # pylint: disable=g-import-not-at-top

  res = int(config.resolution)
  cases = toy_world.eval_cases(res, int(config.toy.prompts_per_subject))
  refs = [toy_world.render(c.subject, res)[0] for c in cases]
  s = config.sampler
  pipes = _pipelines(config, sd_dir, vision_dir, adapters)
  main = pipes['adaptive']
  schedule = schedules.ddim_schedule(main.components.scheduler_config, int(s.num_steps))
  subjects = [Image.fromarray(r) for r in refs]
  conditions = main.encode(subjects, [c.prompt for c in cases], [c.word for c in cases])
  named = main.encode(subjects, [c.named_prompt for c in cases], [c.word for c in cases])
  seeds = tuple(int(x) for x in config.toy.seeds)
  latents = {seed: main.initial_latents(seed, len(cases)) * schedule.init_noise_sigma
             for seed in seeds}

  rows, images, scopes, seconds = {}, {}, {}, {}

  def record(name, seed, generated, scope=None, indices=None):
    indices = range(len(cases)) if indices is None else indices
    rows.setdefault(name, [])
    images.setdefault(name, {}).setdefault(seed, {})
    for j, i in enumerate(indices):
      rows[name].append(toy_metrics.score_image(
          generated[j], cases[i].background, refs[i], cases[i].subject.identity,
          None if scope is None else scope[j]))
      images[name][seed][i] = generated[j]

  for v in variants(config):
    pipe = pipes[v.pipe]
    t0 = time.perf_counter()
    cond = named if v.prompt == 'named' else conditions
    overrides = dict(gamma_scope=v.gamma_scope, binary_mask=v.binary)
    if v.guidance_image is not None:
      overrides['guidance_image'] = v.guidance_image
    settings = sampler.GuidanceSettings.from_config(s, **overrides)
    for seed in seeds:
      if not v.adapter:
        out = sampler.cfg_sample(pipe.model, pipe.params, schedule, latents[seed], cond,
                                 settings)
        scope = None
      else:
        out = sampler.sample(pipe.model, pipe.params, schedule, latents[seed], cond, settings)
        scope = np.asarray(jax.device_get(out.mask))
        scopes.setdefault(v.name, {})[seed] = scope
      record(v.name, seed, pipe.decode(out.latents), scope)
    seconds[v.name] = time.perf_counter() - t0
    _progress(f'eval {v.name}: {seconds[v.name]:.1f}s')

  # G1: the naming caption through the visual branch, nothing trained.
  t0 = time.perf_counter()
  adapter_unet = adapter_lib.split_params(main.params)[1]['unet']
  g1_max_abs = None
  for seed in seeds:
    g1 = gates.visual_path_check(
        main.model.unet, main.components.unet_params, adapter_unet, schedule, latents[seed],
        conditions.text, named.text, conditions.uncond_text, float(s.guidance_text))
    g1_max_abs = float(g1.pop('visual_only_vs_text_max_abs'))
    for name, z in g1.items():
      record(name, seed, main.decode(z))
  _progress(f'eval G1: {time.perf_counter() - t0:.1f}s')

  # The pseudo-word baselines, trained per subject on its one reference.
  t0 = time.perf_counter()
  baseline_curves = _run_baselines(config, main, cases, refs, schedule, conditions, latents,
                                   record)
  _progress(f'eval baselines: {time.perf_counter() - t0:.1f}s')

  # G2: can the trained adapters copy? (subject = the training image itself)
  t0 = time.perf_counter()
  copy = _copy_gate(config, pipes, adapters)
  _progress(f'eval G2: {time.perf_counter() - t0:.1f}s')

  order = list(rows)
  summary = {name: _with_aliases(dict(toy_metrics.summarize(rows[name]), **info))
             for name in order for info in [_variant_info(config, name)]}
  gate_report = _gates(summary, copy, g1_max_abs)
  result = {'eval_key': key, 'variants': summary, 'gates': gate_report,
            'baseline_curves': baseline_curves, 'target': _target(summary),
            'seeds': list(seeds), 'cases': len(cases),
            'subjects': len(toy_world.HELD_OUT), 'sampler_steps': int(s.num_steps),
            'guidance_text': float(s.guidance_text), 'guidance_image': float(s.guidance_image),
            'gamma_num': float(s.gamma_num)}
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  toy_plots.tradeoff_plot(summary, os.path.join(out_dir, 'tradeoff.png'), baseline_curves)
  toy_plots.tradeoff_plot(summary, os.path.join(out_dir, 'tradeoff_sim.png'), baseline_curves,
                          x_key='sim')
  first = seeds[0]
  columns = ['plain_t2i', 'named_prompt', 'no_mask', 'realcustom'] + [
      n for n in (baseline_curves.get('textual_inversion', [])[-1:]
                  + baseline_curves.get('dreambooth', [])[-1:])]
  toy_plots.sample_grid(
      cases, refs, {k: np.stack([images[k][first][i] for i in range(len(cases))])
                    for k in columns}, scopes['realcustom'][first],
      os.path.join(out_dir, 'samples.png'))
  return result


def _encode_reference(pipe, ref):
  """(C, h, w) scaled latents of one reference image (the VAE posterior mean)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from toy import base as toy_base  # pylint: disable=g-import-not-at-top
  c = pipe.components
  raw = toy_base.encode_latents(c.vae, c.vae_params, np.asarray(ref)[None])
  return raw[0] * c.scaling_factor


def _run_baselines(config, pipe, cases, refs, schedule, conditions, latents, record) -> dict:
  """Textual Inversion and DreamBooth per held-out subject, sampled at each checkpoint.

  Returns {method: [variant names in checkpoint order]} (the curves).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from realcustom_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  from toy import baselines  # pylint: disable=g-import-not-at-top
  toy, c = config.toy, pipe.components
  settings = sampler.GuidanceSettings.from_config(config.sampler)
  adapter_part = adapter_lib.split_params(pipe.params)[1]
  unet_apply = lambda p, z, t, text: pipe.model.unet.apply({'params': p}, z, t, text)
  token = baselines.token_id(c.tokenizer, 'sks')
  runs = {'textual_inversion': (tuple(toy.ti_checkpoints), float(toy.ti_lr)),
          'dreambooth': (tuple(toy.db_checkpoints), float(toy.db_lr))}
  curves = {}
  for method, (checkpoints, lr) in runs.items():
    if not checkpoints:
      continue
    curves[method] = [f'{method}_{n}' for n in checkpoints]
    for g, group in enumerate(_subject_groups(cases)):
      subject = cases[group[0]].subject
      learned = baselines.optimise(
          baselines.BaselineSettings(method, checkpoints, lr, batch=int(toy.baseline_batch),
                                     seed=config.seed + g),
          unet_apply=unet_apply, unet_params=c.unet_params, text_encoder=c.text_encoder,
          text_params=c.text_params, tokenizer=c.tokenizer,
          latents=_encode_reference(pipe, refs[group[0]]),
          caption=pseudo_word_prompt(subject, subject.background), pseudo_word='sks',
          scheduler_config=c.scheduler_config)
      prompts = [pseudo_word_prompt(subject, cases[i].background) for i in group]
      for steps, value in learned:
        text = baselines.prompt_text(c.text_encoder, c.text_params, c.tokenizer, prompts,
                                     method, token, value)
        cond = sampler.Conditions(text=jnp.asarray(text),
                                  uncond_text=conditions.uncond_text[jnp.asarray(group)])
        params = pipe.params
        if method == 'dreambooth':
          params = adapter_lib.merge_params({'unet': value}, adapter_part)
        for seed, z in latents.items():
          out = sampler.cfg_sample(pipe.model, params, schedule, z[jnp.asarray(group)], cond,
                                   settings)
          record(f'{method}_{steps}', seed, pipe.decode(out.latents), indices=group)
  return curves


def _copy_gate(config, pipes, adapters) -> dict:
  """G2 for every trained paper-projector adapter, and for both starts untrained."""
  from realcustom_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  from toy import gates  # pylint: disable=g-import-not-at-top
  main = pipes['adaptive']
  c = main.components
  z0, cond = gates.copy_inputs(main, int(config.toy.copy_gate_images),
                               int(config.resolution), config.seed)
  out = {}
  for name in adapters:
    pipe = pipes.get(name)
    if pipe is None or name == 'none':
      continue
    out[f'trained_{name}'] = gates.copy_errors(pipe.model, pipe.params, z0, cond.text,
                                               cond.image, c.scheduler_config)
  random_adapter = main._random_adapter()  # pylint: disable=protected-access
  for mode in adapter_lib.VISUAL_KV_INITS:
    params = adapter_lib.init_visual_kv(
        adapter_lib.merge_params({'unet': c.unet_params}, random_adapter), mode)
    out[f'init_{mode}'] = gates.copy_errors(main.model, params, z0, cond.text, cond.image,
                                            c.scheduler_config)
  return out


def _with_aliases(r: dict) -> dict:
  """The issue's names for the three axes beside the metric keys."""
  return dict(r, text_control=r['text'], subject_sim=r['sim'], identity_acc=r['id'])


def _gates(summary: dict, copy: dict, g1_max_abs: float) -> dict:
  """G0-G3 as numbers, each with the threshold it is read against."""
  v = summary
  trained = copy.get('trained_adaptive', {})
  return {
      'G0': {'named_prompt_identity_acc': v['named_prompt']['id'],
             'plain_t2i_identity_acc': v['plain_t2i']['id'],
             'scope_on_object': v['realcustom'].get('scope_in_object'),
             'passes': v['named_prompt']['id'] >= 0.8 and v['plain_t2i']['id'] <= 0.2},
      'G1': {'eq4_sum_identity_acc': v['g1_eq4_sum']['id'],
             'visual_only_identity_acc': v['g1_visual_only']['id'],
             'doubled_identity_acc': v['g1_doubled']['id'],
             'visual_only_vs_text_max_abs': g1_max_abs,
             'passes': v['g1_visual_only']['id'] >= v['named_prompt']['id'] - 0.1},
      'G2': dict(copy, passes=bool(trained) and all(
          e['margin_vs_none'] > 0.02 and e['margin_vs_shuffled'] > 0.02
          for t, e in trained.items() if t != '100')),
      'G3': {'realcustom_identity_acc': v['realcustom']['id'],
             'realcustom_text_control': v['realcustom']['text'],
             'plain_t2i_text_control': v['plain_t2i']['text'],
             'passes': v['realcustom']['id'] >= 0.5
                       and v['realcustom']['text'] >= v['plain_t2i']['text'] - 0.05},
  }


def _target(summary: dict) -> dict:
  """The issue's target: RealCustom's point and the baseline points that dominate it."""
  rc = summary['realcustom']
  dominating = [name for name, r in summary.items()
                if name.startswith(('textual_inversion_', 'dreambooth_'))
                and r['text'] >= rc['text'] and r['id'] >= rc['id']]
  return {'realcustom_identity_acc': rc['id'], 'realcustom_text_control': rc['text'],
          'plain_t2i_text_control': summary['plain_t2i']['text'],
          'named_prompt_identity_acc': summary['named_prompt']['id'],
          'baselines_at_least_as_good_on_both': dominating,
          'met': (rc['id'] >= 0.5 and summary['named_prompt']['id'] >= 0.8
                  and rc['text'] >= summary['plain_t2i']['text'] - 0.05 and not dominating)}


def _eval_key(config, adapters: dict[str, str]) -> str:
  """Changes when the config or an adapter file does: then the evaluation reruns."""
  h = hashlib.sha256(config.to_json(sort_keys=True).encode())
  for name in sorted(adapters):
    with open(adapters[name], 'rb') as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _variant_info(config, name: str) -> dict:
  """How a result row was sampled (its adapter, scope, gamma, prompt)."""
  by_name = {v.name: v for v in variants(config)}
  v = by_name.get(name)
  if v is None:  # G1 rows and the pseudo-word baselines: plain T2I sampling
    kind = 'g1' if name.startswith('g1_') else 'baseline'
    return {'scoring': kind, 'gamma_scope': None, 'scope': '-', 'prompt': kind}
  scoring = {'': '-', 'none': 'none'}.get(v.adapter, 'adaptive')
  return {'scoring': scoring + (f' ({v.adapter})' if v.adapter == 'copy_text' else ''),
          'gamma_scope': v.gamma_scope if v.adapter else None, 'scope': v.scope,
          'prompt': v.prompt}


def format_table(result: dict) -> str:
  """The results as a Markdown table (mean ± standard error over the samples), then the
  gates."""
  head = ('| variant | scoring | prompt | scope | gamma_scope | n | text control (bg acc) | '
          'subject sim | identity acc | scope on object |')
  lines = [head, '|' + '---|' * 10]
  for name, r in result['variants'].items():
    pm = lambda k: f'{r[k]:.3f} ± {r[k + "_se"]:.3f}' if k in r else '-'
    g = '-' if r['gamma_scope'] is None else f'{r["gamma_scope"]:g}'
    lines.append(f'| {name} | {r["scoring"]} | {r.get("prompt", "plain")} | {r["scope"]} | '
                 f'{g} | {r["n"]} | {pm("text")} | {pm("sim")} | {pm("id")} | '
                 f'{pm("scope_in_object")} |')
  gates = result.get('gates', {})
  for name in ('G0', 'G1', 'G3'):
    if name in gates:
      gate = gates[name]
      values = ', '.join(f'{k} {v:.3f}' for k, v in gate.items()
                         if isinstance(v, float) and k != 'passes')
      lines.append(f'{name} {"passes" if gate["passes"] else "FAILS"}: {values}')
  if 'G2' in gates:
    for run, errors in gates['G2'].items():
      if run == 'passes':
        continue
      margins = ' / '.join(f'{100 * e["margin_vs_none"]:.1f}%' for e in errors.values())
      shuffled = ' / '.join(f'{100 * e["margin_vs_shuffled"]:.1f}%' for e in errors.values())
      lines.append(f'G2 {run}: noise MSE below no subject {margins}, below a shuffled '
                   f'subject {shuffled} at t = {" / ".join(errors)}')
    lines.append(f'G2 {"passes" if gates["G2"]["passes"] else "FAILS"}')
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------


def check_config(config) -> None:
  """ValueError (one line) for `config.toy` values no stage could run with."""
  toy = config.toy
  for key in ('num_train_images', 'vae_steps', 'vae_batch', 'unet_steps', 'unet_batch',
              'checkpoint_every', 'baseline_batch', 'copy_gate_images', 'text_length'):
    if int(toy[key]) <= 0:
      raise ValueError(f'config.toy.{key} must be positive, got {toy[key]}')
  if not toy.seeds:
    raise ValueError('config.toy.seeds is empty')
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


def run(config, workdir: str, base: str = 'train') -> dict:
  """All stages; returns the evaluation result plus stage wall times."""
  times, t_all = {}, time.perf_counter()
  t0 = time.perf_counter()
  shards = stage_world(config, workdir)
  times['world_s'] = time.perf_counter() - t0
  t0 = time.perf_counter()
  sd_dir, vision_dir = stage_base(config, workdir, base)
  times['base_s'] = time.perf_counter() - t0
  adapters = {}
  for name, overrides in adapter_runs(config).items():
    t0 = time.perf_counter()
    adapters[name] = stage_adapter(config, workdir, name, overrides, sd_dir, vision_dir,
                                   shards)
    times[f'adapter_{name}_s'] = time.perf_counter() - t0
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
  if FLAGS.base == 'shipped':
    from toy import shipped  # pylint: disable=g-import-not-at-top
    try:
      shipped.check()
    except ValueError as e:  # a missing or changed shipped model
      print(f'error: {e}', file=sys.stderr)
      sys.exit(2)
  try:
    result = run(config, workdir, FLAGS.base)
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
