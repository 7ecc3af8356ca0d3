"""Training input: the prepared ArrayRecord dataset read through grain.

  source = get_data_source(config, workdir)  # prepares the dataset if needed
  loader = create_train_loader(config, source, tokenize_fn, seed=config.data.shuffle_seed)
  it = iter(loader)
  batch = next(it)  # 'image': (B, H, W, 3) float32 in [-1, 1]; 'input_ids': (B, L) int32

B is the per-process batch, `config.data.batch_size // jax.process_count()`; build the
global array with `jax.make_array_from_process_local_data(sharding, batch[...])`.

The iterator is checkpointable. With orbax, next to the train state:

  mngr = ocp.CheckpointManager(ckpt_dir, item_names=('state', 'data'))
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=grain.checkpoint.CheckpointSave(it)))
  ...
  it = iter(create_train_loader(...))  # same config, source and seed
  mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=grain.checkpoint.CheckpointRestore(it)))  # restores `it` in place

or by hand: `state = it.get_state()` (bytes) and `it.set_state(state)`.

Config keys read (all under `config.data` unless noted):
  toy (bool): prepare the procedural toy shards instead of reading `shards_dir`.
  toy_num_images (int): size of the toy set.
  shards_dir (str): local directory of LAION-style webdataset `.tar` shards.
  tfds_data_dir (str): tfds data directory; empty = `<workdir>/tfds`.
  aesthetic_field (str): score key in each sample's `.json` ('aesthetic').
  min_aesthetic (float): keep samples scoring >= this; <= 0 keeps all (5.0 laion, 0 toy).
  batch_size (int): GLOBAL batch size, divided evenly among processes.
  shuffle_seed (int): seed of the shuffle (used when `seed` is not passed).
  worker_count (int): grain worker processes; 0 reads in the main process.
  precompute_features (bool), feature_dtype (str): train on the frozen encoders'
    stored outputs instead (train/precompute.py, which builds on this module).
  config.resolution (int, top level): side of the square training images, pixels.
"""
from collections.abc import Callable
import os
import tempfile
from typing import Any

from etils import epath
import grain
import jax
import ml_collections
import numpy as np

from realcustom_jax.runtime import cli
from realcustom_jax.runtime import distributed
from realcustom_jax.training_inputs import SUBJECT_REFERENCES
from realcustom_jax.training_inputs import stored_reference
from realcustom_jax.training_inputs import TrainPreprocess
from train import laion_builder
from train import synthetic_data as toy_data

_TOY_IMAGES_PER_SHARD = 64
_TOY_SEED = 0  # the toy set is a fixed data set, independent of the shuffle seed
# How long processes 1.. wait for process 0 to prepare the data set (LAION: hours).
PREPARE_TIMEOUT_S = 24 * 3600


def prepare_toy_dataset(
    data_dir: str | os.PathLike[str], config: ml_collections.ConfigDict
) -> laion_builder.LaionAesthetic:
  """Writes the toy shards under `data_dir` and prepares them; skips done work.

  Args:
    data_dir: tfds data directory; the shards go to `data_dir/toy_shards_*` (to the
      local temporary directory when `data_dir` is a URL: the shard writer is local).
    config: reads `resolution`, `data.toy_num_images`, `data.aesthetic_field` and
      `data.min_aesthetic`.

  Returns:
    The prepared builder.
  """
  num_images = config.data.toy_num_images
  shards_root = tempfile.gettempdir() if cli.is_url(data_dir) else os.fspath(data_dir)
  shards_dir = os.path.join(shards_root, f'toy_shards_n{num_images}_r{config.resolution}')
  if not os.path.isdir(shards_dir):
    # Write to a temporary name first so an interrupted run never leaves a partial set
    # that a later run would take as complete.
    tmp_dir = f'{shards_dir}.tmp{os.getpid()}'
    toy_data.write_toy_shards(
        tmp_dir, num_images, _TOY_IMAGES_PER_SHARD, config.resolution, _TOY_SEED,
        aesthetic_field=config.data.aesthetic_field)
    os.replace(tmp_dir, shards_dir)
  return laion_builder.prepare_dataset(
      shards_dir, data_dir, config.resolution,
      aesthetic_field=config.data.aesthetic_field,
      min_aesthetic=config.data.min_aesthetic)




def get_data_source(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
) -> Any:
  """Returns the training split as a random-access tfds (ArrayRecord) data source.

  Prepares the dataset first when it is not yet prepared: the toy set when
  `config.data.toy`, else the shards in `config.data.shards_dir`. On several hosts,
  process 0 prepares while the others wait (a barrier of up to `PREPARE_TIMEOUT_S`), so
  the directory must be shared by all hosts; for a long preparation run
  `train.prepare` once before the job.

  Args:
    config: the experiment config (see the module docstring for keys).
    workdir: used for `<workdir>/tfds` when `config.data.tfds_data_dir` is empty.

  Returns:
    A `tfds` ArrayRecord data source; items are dicts with 'image' (uint8 HxWx3),
    'caption' (bytes) and 'aesthetic' (float32).
  """
  return get_data_builder(config, workdir).as_data_source(split='train')


def get_data_builder(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike[str]
) -> laion_builder.LaionAesthetic:
  """`get_data_source`'s prepared builder (its `data_dir` locates the set on disk)."""
  check_data_config(config)
  data_dir = os.fspath(tfds_data_dir(config, workdir))

  def prepare():
    if config.data.toy:
      return prepare_toy_dataset(data_dir, config)
    return laion_builder.prepare_dataset(
        config.data.shards_dir, data_dir, config.resolution,
        aesthetic_field=config.data.aesthetic_field,
        min_aesthetic=config.data.min_aesthetic,
        with_reference=stored_reference(config))

  return prepared_by_process_zero_first(prepare, 'realcustom_data_prepared')


def prepared_by_process_zero_first(prepare: Callable[[], Any], barrier_name: str) -> Any:
  """`prepare()` on every process, process 0 first: one writer on a shared directory.

  Process 0 prepares (a no-op when `train.prepare` ran), the others wait on the
  coordination service, then find the work done and only open it. If process 0 fails,
  its peers end through the watchdog (distributed.PeerWatchdog).
  """
  if jax.process_count() == 1:
    return prepare()
  if jax.process_index() == 0:
    result = prepare()
  distributed.barrier(barrier_name, PREPARE_TIMEOUT_S)
  if jax.process_index() != 0:
    result = prepare()
  return result


def check_data_config(config: ml_collections.ConfigDict) -> None:
  """Checks that the config names one data source, and that its shards exist.

  Cheap (one directory listing): training runs it before any model is built.

  Args:
    config: reads `data.toy` and `data.shards_dir`.

  Raises:
    ValueError: both or neither of `toy` and `shards_dir`, or no `.tar` shards there,
      or a `subject_reference` the source cannot give.
  """
  reference = config.data.get('subject_reference', 'self')
  if reference not in SUBJECT_REFERENCES:
    raise ValueError(f'config.data.subject_reference must be one of {SUBJECT_REFERENCES}, '
                     f'got {reference!r}')
  if reference == 'stored' and config.data.toy:
    raise ValueError("config.data.subject_reference='stored' needs shards with KEY.ref.* "
                     'references (config.data.shards_dir); the generated toy shapes have '
                     'none')
  if config.data.toy and config.data.shards_dir:
    # Training on the toy shapes while the user points at real shards would pass
    # silently for hours; the two settings contradict each other.
    raise ValueError(
        f'config.data.shards_dir={config.data.shards_dir} is set but config.data.toy is '
        'True (the generated toy shapes); add --config.data.toy=False to train on the '
        'shards')
  if not config.data.toy:
    if not config.data.shards_dir:
      raise ValueError('config.data.shards_dir is empty and config.data.toy is False')
    try:
      laion_builder.list_shards(config.data.shards_dir)
    except ValueError as e:
      raise ValueError(f'config.data.shards_dir: {e}') from None


def tfds_data_dir(config: ml_collections.ConfigDict,
                  workdir: str | os.PathLike[str]) -> epath.Path:
  """`config.data.tfds_data_dir`, or `<workdir>/tfds`; URLs stay URLs."""
  return cli.absolute_path(config.data.tfds_data_dir or
                           cli.absolute_path(workdir) / 'tfds')


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  """Returns `global_batch_size // process_count`.

  Args:
    global_batch_size: the batch over all processes.
    process_count: number of data-loading processes.

  Returns:
    The batch each process loads.

  Raises:
    ValueError: the global batch is not a positive multiple of `process_count`.
  """
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f'global batch size {global_batch_size} must be a positive multiple of '
        f'the process count {process_count}')
  return global_batch_size // process_count


class ProcessBlockSampler:
  """One global record order; process p reads block p of every global batch.

  The inner sampler orders the records of all processes together (one shuffle per
  epoch over the whole set). Global batch s is its positions [s*B, (s+1)*B); process p
  of P reads positions [s*B + p*B/P, s*B + (p+1)*B/P), the rows its devices hold in
  the global array. So the global batches, and the training, are the same for any
  process count, and within an epoch no record is read twice or skipped.

  `grain.DataLoader` with `ShardOptions(p, P)` asks process p for the indices
  p, p + P, p + 2P, ... (with worker processes, each worker a subset of them); this
  maps each such index to its global position.
  """

  def __init__(self, sampler: Any, shard_options: grain.sharding.ShardOptions,
               per_process_batch: int):
    self._sampler = sampler
    self._count = shard_options.shard_count
    self._batch = per_process_batch
    global_batch = self._batch * self._count
    self._len = len(sampler) // global_batch * global_batch  # whole global batches

  def __len__(self) -> int:
    return self._len

  def __repr__(self) -> str:
    # grain stores it in the iterator checkpoint and refuses a restore when it differs.
    # On one process this sampler reads the inner one as it is, and says so: data
    # checkpoints written before it existed (the plain IndexSampler) still resume.
    if self._count == 1:
      return repr(self._sampler)
    return (f'ProcessBlockSampler({self._sampler!r}, processes={self._count}, '
            f'per_process_batch={self._batch})')

  def global_position(self, index: int) -> int:
    """The position in the global order that loader index `index` reads."""
    k, process = divmod(index, self._count)
    step, row = divmod(k, self._batch)
    return (step * self._count + process) * self._batch + row

  def __getitem__(self, index: int) -> grain.RecordMetadata:
    if not 0 <= index < self._len:
      raise IndexError(f'index {index} out of range [0, {self._len})')
    inner = self._sampler[self.global_position(index)]
    return grain.RecordMetadata(index=index, record_key=inner.record_key, rng=inner.rng)


def create_train_loader(
    config: ml_collections.ConfigDict,
    data_source: Any,
    tokenize_fn: Callable[[str], np.ndarray] | None,
    seed: int | None = None,
    *,
    shard_options: grain.sharding.ShardOptions | None = None,
    num_epochs: int | None = None,
    preprocess: grain.transforms.Map | None = None,
) -> grain.DataLoader:
  """Builds the shuffled, repeated, per-process-batched, checkpointable loader.

  The records are shuffled over the whole set, every epoch anew, and each global batch
  takes the next `data.batch_size` of them; each process reads only its block of rows
  of it (`ProcessBlockSampler`). The global batches do not depend on the process count,
  and within an epoch the processes together read every record once; batches are drawn
  across epoch boundaries.

  With `config.data.worker_count > 0`, grain starts worker processes: under absl, flags
  must already be parsed (run from `app.run`), and `tokenize_fn` and `data_source` must
  be picklable (a module-level function or a `functools.partial`, not a lambda). Each
  worker batches its own records, so the batch order depends on `worker_count` (still
  deterministic for a fixed count); restore a checkpointed iterator with the same count.

  Args:
    config: reads `data.batch_size` (global) and `data.worker_count`,
      `data.shuffle_seed` when `seed` is None.
    data_source: random-access source, e.g. from `get_data_source`; items are dicts
      with 'image' (uint8 HxWx3) and 'caption' (str or bytes).
    tokenize_fn: caption -> 1-D token ids of a fixed length (the CLIP tokenizer padded
      to max_length).
    seed: shuffle seed; same seed, same batches.
    shard_options: defaults to one shard per JAX process; pass explicit
      `grain.sharding.ShardOptions` to simulate several processes.
    num_epochs: None repeats forever.
    preprocess: the per-record transform; default `TrainPreprocess(tokenize_fn)`
      (precomputed features pass `precompute.DecodeFeatures`, and no `tokenize_fn`).

  Returns:
    A `grain.DataLoader`; `iter(loader)` yields dicts 'image' float32
    (B, H, W, 3) in [-1, 1] and 'input_ids' int32 (B, L), with B the per-process batch
    (with `preprocess`, batches of what it returns).
  """
  if preprocess is None:
    preprocess = TrainPreprocess(tokenize_fn)
  if shard_options is None:
    shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  batch_size = per_process_batch_size(
      config.data.batch_size, shard_options.shard_count)
  if seed is None:
    seed = config.data.shuffle_seed
  num_records = len(data_source)
  if num_records < shard_options.shard_count:
    raise ValueError(
        f'the data source has {num_records} records, fewer than the '
        f'{shard_options.shard_count} processes reading it')
  # The order is global (unsharded); ProcessBlockSampler gives each process its rows.
  # One shard of one is no sharding; passing `shard_options` then keeps the sampler's
  # repr, and so older data checkpoints, unchanged.
  sampler = ProcessBlockSampler(grain.samplers.IndexSampler(
      num_records=num_records,
      shard_options=(shard_options if shard_options.shard_count == 1
                     else grain.sharding.NoSharding()),
      shuffle=True,
      num_epochs=num_epochs,
      seed=seed,
  ), shard_options, batch_size)
  return grain.DataLoader(
      data_source=data_source,
      sampler=sampler,
      operations=[
          preprocess,
          grain.transforms.Batch(batch_size=batch_size, drop_remainder=True),
      ],
      worker_count=config.data.worker_count,
      shard_options=shard_options,
  )

