"""`python -m train.main` with two test hooks, for tests/test_multiprocess.py.

  python tests/multiprocess_worker.py --config=configs/tiny.py --workdir=W ...

Same flags and behaviour as `train.main`. Environment variables switch the hooks on:
  RC_TEST_KEYS_DIR: each process appends the record keys of every batch it trains on
    to `keys_<process>.jsonl` there (one line per step: {"step", "keys"}).
  RC_TEST_KILL_PROCESS, RC_TEST_KILL_AFTER_CHECKPOINT: that process sends itself
    SIGKILL just before the step after that checkpoint, once the checkpoint is on disk
    (kill -9 mid-run, at a point a test can reproduce).

Keys are recovered from the batch itself (a hash of each image, mapped back to the
record read): what the step consumed, not what grain's read-ahead fetched.

For speed only, the workers also share JAX's persistent compilation cache: on CPU
JAX keys each entry by a topology fingerprint that differs between the processes, and
only process 0 writes entries, so process 1 would recompile the train step on every
launch (~30 s of the suite's 2 cores). Keyed by device kinds instead (JAX's own fallback),
process 1 loads what process 0 wrote. The tests compare the results with a
one-process run and between runs, so a wrongly shared executable would fail them.
"""
import hashlib
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from realcustom_jax.runtime import cli  # noqa: E402
from realcustom_jax.runtime import sharding  # noqa: E402
from train import input_pipeline  # noqa: E402
from train import main as train_main  # noqa: E402  (defines the flags)


def _digest(image_u8: np.ndarray) -> str:
  return hashlib.sha1(np.ascontiguousarray(image_u8).tobytes()).hexdigest()


class _KeyedSource:
  """The data source, remembering which record key each image came from."""

  def __init__(self, source, keys: dict):
    self._source, self._keys = source, keys

  def __len__(self):
    return len(self._source)

  def __repr__(self):  # stored in the iterator checkpoint: same as the plain source
    return repr(self._source)

  def __getitem__(self, key):
    item = self._source[key]
    digest = _digest(np.asarray(item['image'], np.uint8))
    if self._keys.setdefault(digest, int(key)) != int(key):
      raise AssertionError(f'records {self._keys[digest]} and {key} hold the same image')
    return item


def _install_hooks() -> None:
  keys_dir = os.environ.get('RC_TEST_KEYS_DIR')
  kill_process = int(os.environ.get('RC_TEST_KILL_PROCESS', '-1'))
  kill_after = int(os.environ.get('RC_TEST_KILL_AFTER_CHECKPOINT', '-1'))
  image_keys: dict[str, int] = {}
  state = {'workdir': None, 'step': None}

  get_data_source = input_pipeline.get_data_source

  def keyed_get_data_source(config, workdir):
    state['workdir'] = os.fspath(workdir)
    return _KeyedSource(get_data_source(config, workdir), image_keys)

  shard_batch = sharding.shard_batch

  def hooked_shard_batch(local, mesh):
    if state['step'] is None:  # first step of this run: after a resume, not 1
      from train import train  # pylint: disable=g-import-not-at-top
      latest = train.latest_checkpoint_step(state['workdir'])
      state['step'] = (latest or 0)
    state['step'] += 1
    me = jax.process_index()
    if me == kill_process and state['step'] == kill_after + 1:
      ckpt = os.path.join(state['workdir'], 'checkpoints', str(kill_after))
      deadline = time.monotonic() + 120
      while not os.path.isdir(ckpt) and time.monotonic() < deadline:
        time.sleep(0.05)  # the async save of `kill_after` finishes on disk first
      os.kill(os.getpid(), signal.SIGKILL)
    if keys_dir:
      # Undo TrainPreprocess's uint8 -> [-1, 1] scaling (exact after rounding).
      images = np.rint((np.asarray(local['image'], np.float64) + 1.0) * 127.5)
      keys = [image_keys[_digest(im.astype(np.uint8))] for im in images]
      with open(os.path.join(keys_dir, f'keys_{me}.jsonl'), 'a') as f:
        f.write(json.dumps({'step': state['step'], 'keys': keys}) + '\n')
    return shard_batch(local, mesh)

  input_pipeline.get_data_source = keyed_get_data_source
  sharding.shard_batch = hooked_shard_batch


def _share_compile_cache_between_processes() -> None:
  from jax._src import cache_key  # pylint: disable=g-import-not-at-top
  if hasattr(cache_key, '_hash_accelerator_config') and hasattr(cache_key, '_hash_devices'):
    cache_key._hash_accelerator_config = cache_key._hash_devices  # pylint: disable=protected-access


if __name__ == '__main__':
  _share_compile_cache_between_processes()
  _install_hooks()
  app.run(train_main.main, flags_parser=cli.flags_parser('error: '))
