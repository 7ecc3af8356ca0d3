"""Trains the RealCustom adapter (Sec. 3.2) on a frozen Stable Diffusion: the loop.

The step itself (Eqs. 1, 2, 10) and its setup live in `realcustom_jax.adapter_training`. This
module adds what a run needs around it: config validation, loading the frozen
components, the grain input pipeline, resumable orbax checkpoints (train state and
data iterator), metrics in `metrics.jsonl` and a guard that stops on a NaN loss.

With `config.data.precompute_features` the frozen encoders run once over the prepared
set before training (train/precompute.py) and the loop trains on their stored outputs
(`adapter_training.precomputed_train_step`); the VAE and CLIP then stay off the devices.

The model family (`pipelines.family_for`, chosen once from `config.pipeline`) supplies
the frozen models, the per-record preprocessing, the step and the export: the paper's
SD + CLIP adapter, or (configs/release_train.py) the authors' released SDXL
architecture with its projector and visual K/V, through the same loop.

Config keys read (besides the model/data ones): `config.train.*` (see
`validate_config`), `config.mesh.{data,fsdp,distributed}`.
"""
import contextlib
import json
import os
import signal
import socket
import threading
import time
from typing import Mapping, Optional

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from realcustom_jax import adapter as adapter_lib
from realcustom_jax.runtime import cli
from realcustom_jax.runtime import distributed
from realcustom_jax.runtime import sharding
from realcustom_jax.adapter_training import ConfigError
from realcustom_jax.model import DTYPES
from realcustom_jax.model import check_model_config
from realcustom_jax.adapter_training import State
from realcustom_jax import family as family_lib
from realcustom_jax import pipelines
from train import input_pipeline
from train import precompute

CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradient norm) became NaN/inf; the run stops, checkpoints stay."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written (disk full, a lost mount, no permission); the run
  stops, the checkpoints written before stay complete."""


# ---------------------------------------------------------------------------------
# Config and frozen components
# ---------------------------------------------------------------------------------


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the training keys up front, so mistakes are one-line errors, not traces.

  Raises:
    ConfigError: a missing section, an out-of-range value, or a missing data directory.
  """
  for section in ('model', 'data', 'train', 'mesh'):
    if section not in config:
      raise ConfigError(f'config has no `{section}` section')
  t = config.train
  try:
    family = pipelines.family_for(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for key in ('num_steps', 'checkpoint_every', 'log_every', 'max_to_keep'):
    if int(t[key]) <= 0:
      raise ConfigError(f'config.train.{key} must be positive, got {t[key]}')
  if t.get('on_damaged_checkpoint', 'fall_back') not in DAMAGED_CHECKPOINTS:
    raise ConfigError(f'config.train.on_damaged_checkpoint must be one of '
                      f'{DAMAGED_CHECKPOINTS}, got {t.on_damaged_checkpoint!r}')
  if not float(t.learning_rate) > 0:
    raise ConfigError(f'config.train.learning_rate must be positive, got {t.learning_rate}')
  if t.frozen_dtype not in DTYPES:
    raise ConfigError(f'config.train.frozen_dtype must be one of {sorted(DTYPES)}, got '
                      f'{t.frozen_dtype!r}')
  try:
    check_model_config(config.model)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if int(config.data.batch_size) <= 0:
    raise ConfigError(f'config.data.batch_size must be positive, got {config.data.batch_size}')
  try:
    input_pipeline.check_data_config(config)  # one listing: the shards exist
    precompute.check_config(config, family)
    family.check_training_config(config)  # its own keys and weights
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_workdir(workdir: str) -> epath.Path:
  """Creates `workdir` (a path or URL) and proves it writable, before models are built.

  Args:
    workdir: the --workdir flag.

  Returns:
    The workdir as an absolute `epath.Path` (URLs unchanged).

  Raises:
    ConfigError: it cannot be created, or a file cannot be written in it.
  """
  path = cli.absolute_path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except
    # OSError locally; remote file systems raise their own types.
    raise ConfigError(f'cannot create --workdir {workdir}: '
                      f'{getattr(e, "strerror", None) or e}') from None
  # An existing read-only directory passes mkdir; tfds would fail on it only after the
  # models are built, so write (and remove) a file now.
  probe = path / f'.write_check_{socket.gethostname()}_{os.getpid()}'
  try:
    probe.write_text('')
    probe.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f'--workdir {workdir} is not writable: '
                      f'{getattr(e, "strerror", None) or e}') from None
  return path


def load_components(config, family: family_lib.Family):
  """The family's frozen models (`Family.load_training_components`), its mistakes as
  ConfigError (one line, exit 2)."""
  try:
    return family.load_training_components(config)
  except ValueError as e:  # CheckpointError and size mismatches are user mistakes
    raise ConfigError(str(e)) from None


# ---------------------------------------------------------------------------------
# Metrics and checkpoints
# ---------------------------------------------------------------------------------


def truncate_metrics(path: epath.Path, last_step: int) -> list[str]:
  """Drops the lines of `path` (metrics.jsonl) after `last_step`; returns those kept.

  A run that crashed after its last checkpoint logged steps that the resumed run
  replays; without this they would appear twice.
  """
  if not path.exists():
    return []
  lines = path.read_text().splitlines()
  kept = [line for line in lines if line.strip() and json.loads(line)['step'] <= last_step]
  if len(kept) != len(lines):
    logging.info('%s: dropped %d line(s) after step %d (replayed on resume)', path,
                 len(lines) - len(kept), last_step)
    path.write_text(''.join(line + '\n' for line in kept))
  return kept


class MetricWriter:
  """Writes each logged step's metrics as TensorBoard events and as a JSON line.

  Events go to `<workdir>/tensorboard` through tensorboardX (TensorFlow-free);
  `<workdir>/metrics.jsonl` is the same data for scripts. Only process 0 writes.

  A run resumed from step `start_step` replays the steps its predecessor logged after
  that checkpoint; they appear once: metrics.jsonl loses its lines after `start_step`,
  and the new TensorBoard event file starts with a purge marker at `start_step + 1`
  (tensorboardX `purge_step`), which makes TensorBoard hide the older events from there.
  """

  def __init__(self, workdir: str, start_step: int = 0):
    root = cli.absolute_path(workdir)
    self._path = root / METRICS_FILE
    # Object stores (gs://) cannot append: there the whole file is rewritten per write.
    self._append = not cli.is_url(root)
    self._enabled = jax.process_index() == 0
    self._lines: list[str] = []
    self._tb = None
    if self._enabled:
      self._lines = truncate_metrics(self._path, start_step)
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.fspath(root / TENSORBOARD_DIR),
                               purge_step=start_step + 1)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    self.write_steps([(step, metrics)])

  def write_steps(self, steps: list[tuple[int, Mapping[str, float]]]) -> None:
    """Writes several steps with one file write and one TensorBoard flush."""
    if not self._enabled or not steps:
      return
    lines = []
    for step, metrics in steps:
      values = {k: float(v) for k, v in metrics.items()}
      lines.append(json.dumps({'step': int(step), **values}))
      for name, value in values.items():
        self._tb.add_scalar(f'train/{name}', value, int(step))
    self._lines.extend(lines)
    if self._append:
      with self._path.open('a') as f:
        f.write(''.join(line + '\n' for line in lines))
    else:
      self._path.write_text(''.join(line + '\n' for line in self._lines))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def checkpoint_manager(workdir: str, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=int(config.train.max_to_keep),
                                         create=True)
  return ocp.CheckpointManager(cli.absolute_path(workdir) / CHECKPOINT_DIR,
                               item_names=('state', 'data', 'config'), options=options)


DAMAGED_CHECKPOINTS = ('fall_back', 'stop')
DAMAGED_SUFFIX = '.damaged'
_SET_ASIDE_TIMEOUT_S = 600


def _one_line(error: Exception, limit: int = 200) -> str:
  """The first line of an error, cut to `limit` characters (TensorStore's run long)."""
  text = (str(error).strip().splitlines() or [type(error).__name__])[0]
  text = text.split(' See full TensorStore details')[0]
  return f'{type(error).__name__}: {text[:limit]}'


def _save_error(mngr: ocp.CheckpointManager, step: Optional[int],
                error: OSError) -> CheckpointSaveError:
  good = [s for s in mngr.all_steps() if s != step]
  what = f'step {step}' if step is not None else 'the last checkpoint'
  return CheckpointSaveError(
      f'saving {what} failed ({_one_line(error)}); the run stops. Latest complete '
      f'checkpoint: step {max(good) if good else None}: free space (or fix the '
      'directory) and rerun to resume from it')


def _save(mngr: ocp.CheckpointManager, step: int, args, force: bool = False) -> None:
  """`mngr.save`, a write failure turned into one CheckpointSaveError line.

  Orbax writes into a temporary directory and renames it when complete, so a failed
  save leaves the earlier checkpoints as they were.
  """
  try:
    mngr.save(step, args=args, force=force)
  except OSError as e:
    raise _save_error(mngr, step, e) from None


class PreemptionNotice:
  """SIGTERM (the notice a TPU spot VM, SLURM or Kubernetes gives before it kills the
  job), turned into "save at the next step and stop".

  On one process a SIGTERM handler sets the flag. On several, orbax's
  `CheckpointManager.reached_preemption(step)` (JAX's preemption sync point, which
  listens for the signal itself) makes every process agree on the same step.
  Installed only from the main thread; the previous handler comes back on `close`.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def reached(self, mngr: ocp.CheckpointManager, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(mngr.reached_preemption(step))
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def restore_newest_good(mngr: ocp.CheckpointManager, workdir: str, config, abstract_state,
                        data_iter) -> tuple[State, int]:
  """Restores the newest checkpoint that restores completely: state and data position.

  A checkpoint that fails to restore (a missing or truncated file, corrupt metadata)
  is set aside as `STEP.damaged` (renamed by process 0, never deleted) with one line
  naming the step and the reason, and the next newest is tried; with
  `config.train.on_damaged_checkpoint='stop'` the first failure ends the run instead.
  Every process tries the same steps in the same order, so all resume from one step.

  Raises:
    ConfigError: a checkpoint of another adapter layout, a damaged checkpoint with
      'stop', or no checkpoint that restores.
  """
  policy = config.train.get('on_damaged_checkpoint', 'fall_back')
  ckpt_dir = cli.absolute_path(workdir) / CHECKPOINT_DIR
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      stored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      reason = _one_line(e)
    else:
      try:
        adapter_lib.check_layout(stored['config'].get('adapter_layout'),
                                 f'checkpoint {step} in {workdir}')
      except ValueError as e:
        raise ConfigError(f'{e}, or use a new --workdir') from None
      # Another process count: each process's iterator state does not carry over, the
      # global data position (the step: one global batch each) does.
      elastic = check_elastic_resume(stored['config'], config, step, workdir)
      items = dict(state=ocp.args.StandardRestore(abstract_state))
      if not elastic:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
      try:
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # pylint: disable=broad-except
        reason = _one_line(e)
      else:
        if elastic:
          seek_global_batches(data_iter, step, int(config.data.batch_size))
        return restored['state'], step
    if policy == 'stop':
      raise ConfigError(f'checkpoint {step} in {ckpt_dir} does not restore ({reason}); '
                        "--config.train.on_damaged_checkpoint=fall_back resumes from the "
                        'newest one that does')
    logging.warning('checkpoint %d does not restore (%s): set aside as %d%s, trying the '
                    'one before', step, reason, step, DAMAGED_SUFFIX)
    damaged.append(step)
    if jax.process_index() == 0:
      (ckpt_dir / str(step)).rename(ckpt_dir / f'{step}{DAMAGED_SUFFIX}')
    distributed.barrier(f'realcustom_damaged_checkpoint_{step}', _SET_ASIDE_TIMEOUT_S)
    mngr.reload()
  raise ConfigError(f'no checkpoint in {ckpt_dir} restores (set aside: '
                    f'{", ".join(f"{s}{DAMAGED_SUFFIX}" for s in damaged)}); start a new '
                    '--workdir, or move a .damaged directory back after repairing it')


def check_elastic_resume(stored: Mapping, config, step: int, workdir: str) -> bool:
  """Whether checkpoint `step` was written by another process count (then the data
  position is set from the step, `seek_global_batches`, instead of each process's
  iterator state). Checkpoints that do not say (older ones) are taken as this count.

  Raises:
    ConfigError: a changed global batch, or worker processes on either side (their
      iterator states interleave per worker, which the step alone does not give).
  """
  processes = stored.get('data_processes')
  if processes is None or int(processes) == jax.process_count():
    return False
  where = f'checkpoint {step} in {workdir}'
  batch = int(stored.get('data', {}).get('batch_size', -1))
  if batch != int(config.data.batch_size):
    raise ConfigError(f'{where} was trained with global batch {batch}, this run has '
                      f'config.data.batch_size={config.data.batch_size}: the data position '
                      'of a resumed run needs the same global batch (or a new --workdir)')
  workers = (int(stored.get('data', {}).get('worker_count', 0)),
             int(config.data.worker_count))
  if any(workers):
    raise ConfigError(f'{where} was written by {processes} process(es), this run has '
                      f'{jax.process_count()}: resuming on another process count needs '
                      'config.data.worker_count=0 (before and now)')
  logging.info('%s was written by %d process(es), this run has %d: the data position '
               'continues from global batch %d', where, int(processes),
               jax.process_count(), step)
  return True


def seek_global_batches(data_iter, global_batches: int, global_batch_size: int) -> None:
  """Puts this process's loader iterator (worker_count 0) after `global_batches` global
  batches: grain reads loader indices p, p + P, ... (`ProcessBlockSampler`), so after
  n per-process rows its last index is (n - 1) * P + p."""
  count, index = jax.process_count(), jax.process_index()
  rows = global_batches * input_pipeline.per_process_batch_size(global_batch_size, count)
  state = json.loads(data_iter.get_state())
  state['last_seen_indices'] = {'0': (rows - 1) * count + index}
  data_iter.set_state(json.dumps(state, indent=4).encode())


def latest_checkpoint_step(workdir: str) -> Optional[int]:
  """The latest checkpoint's step in `workdir`, or None; reads only directory names."""
  ckpt_dir = cli.absolute_path(workdir) / CHECKPOINT_DIR
  if not ckpt_dir.exists():
    return None
  with ocp.CheckpointManager(
      ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    return mngr.latest_step()


@contextlib.contextmanager
def _stage(what: str):
  """Logs a start-up stage before it starts and when it ends, with its time."""
  logging.info('%s ...', what)
  t0 = time.perf_counter()
  yield
  logging.info('%s: done in %.1fs', what, time.perf_counter() - t0)


def _check_finite(pending: list[tuple[int, dict]], latest_ckpt: Optional[int]) -> None:
  for step, m in pending:
    if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
      raise NonFiniteLossError(
          f'non-finite loss {m["loss"]} (grad norm {m["grad_norm"]}) at step {step}; '
          f'stopping. Latest checkpoint: step {latest_ckpt}')


# ---------------------------------------------------------------------------------
# train_and_evaluate
# ---------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Optional[State]:
  """Trains the adapter to `config.train.num_steps`, resuming from the latest checkpoint.

  Args:
    config: the experiment config.
    workdir: checkpoints (`checkpoints/`), metrics (`metrics.jsonl`) and the prepared
      data set (`tfds/`, unless `config.data.tfds_data_dir`).

  Returns:
    The final train state, or None when the latest checkpoint had already reached
    `config.train.num_steps` (nothing is built or compiled then).

  Raises:
    ConfigError: a user mistake in the config.
    NonFiniteLossError: the loss became NaN/inf; the checkpoints before it are kept.
  """
  # Every check that needs no model comes first: a mistake costs seconds, not minutes.
  validate_config(config)
  check_workdir(workdir)
  t = config.train
  done = latest_checkpoint_step(workdir)
  if done is not None and done >= int(t.num_steps):
    logging.info('checkpoint step %d in %s already reaches config.train.num_steps=%d: '
                 'nothing to do (raise num_steps to train on)', done, workdir,
                 int(t.num_steps))
    return None
  logging.info('config and --workdir %s checked; %s', workdir,
               f'resuming from step {done}' if done is not None else 'starting at step 0')

  # ---- Mesh ----
  try:
    mesh = sharding.create_mesh(config.mesh)
    sharding.check_batch_size(int(config.data.batch_size), mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  logging.info('mesh %s over %d devices (%d processes)', dict(mesh.shape),
               jax.device_count(), jax.process_count())

  # ---- Input ----
  family = pipelines.family_for(config)  # validated above
  with _stage(f'loading the frozen models ({config.pretrained or "tiny random"})'):
    loaded = load_components(config, family)
  precomputed = precompute.enabled(config)  # the paper family's alone (validated)
  try:
    if precomputed:
      with _stage('preparing / opening the data set and its precomputed features'):
        source = precompute.get_feature_source(config, workdir, *loaded)
      preprocess = precompute.DecodeFeatures(source.layout)
    else:
      with _stage('preparing / opening the data set'):
        source = input_pipeline.get_data_source(config, workdir)
      preprocess = family.train_preprocess(config, loaded)
    loader = input_pipeline.create_train_loader(config, source, None, preprocess=preprocess)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  data_iter = iter(loader)

  # ---- Model & optimizer, shard & transfer ----
  logging.info('building the adapter and placing the frozen weights ...')
  t0 = time.perf_counter()
  setup, shapes = family.setup_training(config, mesh, loaded, with_encoders=not precomputed)
  state, frozen = setup.state, setup.frozen
  logging.info('adapter: %d trainable parameters; frozen: %d; setup %.1fs',
               adapter_lib.count_params(state['params']),
               adapter_lib.count_params(frozen), time.perf_counter() - t0)
  b = int(config.data.batch_size)
  if precomputed:
    abstract_batch = {k: jax.ShapeDtypeStruct((b,) + shape, dtype)
                      for k, (shape, dtype) in source.layout.items()}
  else:
    abstract_batch = family.abstract_batch(config, loaded, shapes, b)
  step_fn = setup.train_step(abstract_batch, precomputed=precomputed)
  logging.info('compiling the train step ...')
  t0 = time.perf_counter()
  # Ahead-of-time compile: the compile time is visible, and a retrace would fail loudly.
  compiled_step = step_fn.lower(state, frozen, abstract_batch).compile()
  logging.info('train step compiled in %.1fs', time.perf_counter() - t0)

  # ---- Restore ----
  mngr = checkpoint_manager(workdir, config)
  if mngr.latest_step() is not None:
    abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
        setup.state_sharding)
    state, latest = restore_newest_good(mngr, workdir, config, abstract_state, data_iter)
    logging.info('resumed from step %d', latest)
  start_step = int(jax.device_get(state['step']))

  # ---- Loop ----
  config_json = json.loads(config.to_json_best_effort())
  config_json['adapter_layout'] = adapter_lib.ADAPTER_LAYOUT  # read by resume and export
  config_json['data_processes'] = jax.process_count()  # read by an elastic resume
  config_json.update(family.checkpoint_extras(loaded))  # what train.export needs besides
  return run_steps(config, workdir, mngr, compiled_step, state, frozen, data_iter, mesh,
                   config_json, start_step, precomputed)


def run_steps(config, workdir: str, mngr: ocp.CheckpointManager, compiled_step,
              state: State, frozen, data_iter, mesh, config_json: dict, start_step: int,
              precomputed: bool) -> State:
  """The training loop from `start_step`: steps, metrics (one host sync per log or
  checkpoint interval), checkpoints with the data position and `config_json`, and a
  SIGTERM turned into a save at the current step.

  Raises:
    NonFiniteLossError: the loss became NaN/inf (no checkpoint after it).
    CheckpointSaveError: a checkpoint could not be written.
  """
  t = config.train
  writer = MetricWriter(workdir, start_step)
  debug_nan_step = int(t.get('debug_nan_step', -1))
  pending: list[tuple[int, dict]] = []
  t_last, steps_since = time.perf_counter(), 0
  preemption = PreemptionNotice()
  try:
    for step in range(start_step + 1, int(t.num_steps) + 1):
      local = next(data_iter)
      if step == debug_nan_step:
        # Testing hook: a corrupt batch drives the real step to a NaN loss.
        corrupt = 'latent_mean' if precomputed else 'image'
        local = dict(local, **{corrupt: np.full_like(local[corrupt], np.nan)})
      batch = sharding.shard_batch(local, mesh)
      state, metrics = compiled_step(state, frozen, batch)
      pending.append((step, metrics))
      steps_since += 1
      preempted = preemption.reached(mngr, step)
      is_ckpt = (step % int(t.checkpoint_every) == 0 or step == int(t.num_steps)
                 or preempted)
      if step % int(t.log_every) == 0 or is_ckpt:
        # One host sync per log/checkpoint interval, and never a checkpoint after a NaN.
        fetched = [(s, {k: float(v) for k, v in jax.device_get(m).items()}) for s, m in pending]
        _check_finite(fetched, mngr.latest_step())
        pending = []
        rate = steps_since / (time.perf_counter() - t_last)
        t_last, steps_since = time.perf_counter(), 0
        writer.write_steps([(s, dict(m, steps_per_sec=rate)) for s, m in fetched])
        logging.info('step %d  loss %.5f  grad_norm %.4f  %.2f steps/s', step,
                     fetched[-1][1]['loss'], fetched[-1][1]['grad_norm'], rate)
      if is_ckpt:
        _save(mngr, step, ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(config_json)), force=preempted)
      if preempted:
        mngr.wait_until_finished()
        logging.warning('preempted (SIGTERM): saved a checkpoint at step %d; rerun the same '
                        'command to resume from it', step)
        break
  finally:
    preemption.close()
    # Also on a NaN: an in-flight async save of the last good step completes.
    try:
      mngr.wait_until_finished()
    except OSError as e:
      raise _save_error(mngr, None, e) from None
    finally:
      mngr.close()
    writer.close()
  return state
