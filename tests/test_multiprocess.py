"""The pod path on one machine: 2 processes x 4 fake CPU devices train like 1 x 8.

Each test that launches processes runs `tests/multiprocess_worker.py` (= `train.main`
plus hooks that record the consumed record keys or kill a process) with the
environment a user sets by hand off TPU/SLURM: JAX_COORDINATOR_ADDRESS on a free
loopback port, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Every process runs in its own process
group with a deadline; the group is killed when a test ends, passed or not.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grain
import jax
import ml_collections
import numpy as np
import portpicker
import pytest

from realcustom_jax.runtime import distributed
from realcustom_jax import training_inputs
from train import export
from train import input_pipeline
from train import train
from tests import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'multiprocess_worker.py')
NUM_RECORDS, BATCH, STEPS = 32, 8, 4  # 4 steps x 8 = one epoch of the toy set
OVERRIDES = {'data.toy_num_images': NUM_RECORDS, 'data.batch_size': BATCH,
             'train.num_steps': STEPS, 'train.checkpoint_every': 2, 'train.log_every': 1}
PEER_TIMEOUT_S = 10  # generous: the suite shares 2 cores with compiles
RUN_TIMEOUT_S = 300  # a 2-process run takes ~45 s on 2 busy cores


def _config(tfds_dir) -> ml_collections.ConfigDict:
  return testing.toy_train_config(tfds_dir, **OVERRIDES)


class _Processes:
  """Started worker processes; `close` kills whatever still runs (its whole group)."""

  def __init__(self, procs, logs):
    self.procs, self.logs = procs, logs

  def wait(self, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    for p in self.procs:
      try:
        p.wait(timeout=max(deadline - time.monotonic(), 0.1))
      except subprocess.TimeoutExpired:
        self.close()
        pytest.fail(f'processes still running after {timeout_s}s:\n{self.tails()}')
    return [p.returncode for p in self.procs]

  def log(self, i: int) -> str:
    with open(self.logs[i]) as f:
      return f.read()

  def errors(self, i: int) -> list[str]:
    return [l for l in self.log(i).splitlines() if l.startswith('error:')]

  def tails(self) -> str:
    return '\n'.join(f'--- process {i}:\n' + self.log(i)[-3000:] for i in range(len(self.procs)))

  def close(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        try:
          os.killpg(p.pid, signal.SIGKILL)  # start_new_session: pgid == pid
        except ProcessLookupError:
          pass
        p.wait()


def _launch(workdir, tfds_dir, *, num_processes=2, process_ids=None, extra_env=None,
            flags=(), port=None, tag='run') -> _Processes:
  port = port or portpicker.pick_unused_port()
  procs, logs = [], []
  for i in range(num_processes) if process_ids is None else process_ids:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
               JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
               JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i),
               XLA_FLAGS='--xla_force_host_platform_device_count=4', **(extra_env or {}))
    log = os.path.join(str(workdir) + f'.{tag}.{i}.log')
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, 'w') as out:
      procs.append(subprocess.Popen(
          [sys.executable, WORKER, '--config=configs/tiny.py', f'--workdir={workdir}',
           *(f'--config.{k}={v}' for k, v in OVERRIDES.items()),
           f'--config.data.tfds_data_dir={tfds_dir}', '--config.mesh.distributed=True',
           f'--peer_timeout={PEER_TIMEOUT_S}', '--coordinator_timeout=120', *flags],
          cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
          start_new_session=True))
    logs.append(log)
  return _Processes(procs, logs)


def _metrics(workdir):
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _max_abs_diff(a, b) -> float:
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """One uninterrupted 2-process run on a fresh data directory (process 0 prepares)."""
  root = tmp_path_factory.mktemp('mp')
  workdir, tfds_dir, keys_dir = root / 'straight', root / 'tfds', root / 'keys'
  keys_dir.mkdir()
  run = _launch(workdir, tfds_dir, extra_env={'RC_TEST_KEYS_DIR': str(keys_dir)})
  try:
    t0 = time.monotonic()
    codes = run.wait(RUN_TIMEOUT_S)
    seconds = time.monotonic() - t0
    assert codes == [0, 0], run.tails()
    logs = [run.log(0), run.log(1)]
  finally:
    run.close()
  params, _, _ = export.load_checkpoint_adapter(str(workdir))
  keys = {}
  for p in range(2):
    with open(keys_dir / f'keys_{p}.jsonl') as f:
      keys[p] = [json.loads(line) for line in f]
  print(f'\n2-process run: {seconds:.1f}s')
  return dict(workdir=str(workdir), tfds_dir=tfds_dir, params=params, keys=keys,
              logs=logs, keys_dir=keys_dir)


@pytest.fixture(scope='module')
def one_process_run(two_process_run, tmp_path_factory):
  """The same config in this process on the 8 fake devices of conftest.py."""
  workdir = str(tmp_path_factory.mktemp('single'))
  state = train.train_and_evaluate(_config(two_process_run['tfds_dir']), workdir)
  return dict(workdir=workdir, params=jax.device_get(state['params']))


def test_two_processes_train_like_one(two_process_run, one_process_run):
  multi, single = _metrics(two_process_run['workdir']), _metrics(one_process_run['workdir'])
  assert [m['step'] for m in multi] == [m['step'] for m in single] == [1, 2, 3, 4]
  losses = [(m['loss'], s['loss']) for m, s in zip(multi, single)]
  diff = _max_abs_diff(two_process_run['params'], one_process_run['params'])
  print(f'\nlosses (2 processes, 1 process): {losses}; adapter max |diff| {diff:.3g}')
  np.testing.assert_allclose(*zip(*losses), rtol=1e-5)
  assert diff <= 1e-5
  # The adapter moved after step 2 (equal-but-untrained runs would pass the above).
  at2, _, _ = export.load_checkpoint_adapter(two_process_run['workdir'], step=2)
  assert _max_abs_diff(at2, two_process_run['params']) > 1e-4
  assert all('(2 processes)' in log for log in two_process_run['logs'])


def test_each_process_reads_its_block_of_every_global_batch(two_process_run):
  keys = two_process_run['keys']
  per_process = {p: [k for line in keys[p] for k in line['keys']] for p in keys}
  print(f'\nrecords consumed per process: { {p: len(v) for p, v in per_process.items()} }')
  assert [line['step'] for line in keys[0]] == [line['step'] for line in keys[1]] == [
      1, 2, 3, 4]
  # One epoch: together every record once, none twice, none skipped.
  assert len(per_process[0]) == len(per_process[1]) == NUM_RECORDS // 2
  assert sorted(per_process[0] + per_process[1]) == list(range(NUM_RECORDS))
  # The global batch is the one-process batch: process p holds rows [4p, 4p + 4).
  order = grain.samplers.IndexSampler(NUM_RECORDS, grain.sharding.NoSharding(),
                                      shuffle=True, seed=0)
  for step in range(STEPS):
    glob = [order[step * BATCH + i].record_key for i in range(BATCH)]
    assert keys[0][step]['keys'] + keys[1][step]['keys'] == glob


def test_data_is_prepared_once_by_process_zero(two_process_run):
  # Process 1 waited at the barrier and opened the set process 0 had written.
  prepared = [log.count('preparing / opening the data set: done') for log in
              two_process_run['logs']]
  assert prepared == [1, 1]
  shard_dirs = [d for d in os.listdir(two_process_run['tfds_dir']) if 'toy_shards' in d]
  assert shard_dirs == [f'toy_shards_n{NUM_RECORDS}_r32']  # no second, racing copy


@pytest.mark.slow  # `make test-slow` (Makefile: the suite's time budget)
def test_kill_9_mid_run_then_restart_equals_the_uninterrupted_run(two_process_run, tmp_path):
  workdir = tmp_path / 'killed'
  run = _launch(workdir, two_process_run['tfds_dir'], tag='first', extra_env={
      'RC_TEST_KILL_PROCESS': '1', 'RC_TEST_KILL_AFTER_CHECKPOINT': '2'})
  try:
    run.procs[1].wait(timeout=RUN_TIMEOUT_S)
    killed_at = time.monotonic()
    codes = run.wait(PEER_TIMEOUT_S + 60)
    survivor_s = time.monotonic() - killed_at
    print(f'\nprocess 0 ended {survivor_s:.1f}s after process 1 was killed')
    assert codes == [1, -signal.SIGKILL], run.tails()
    errors = run.errors(0)
    assert len(errors) == 1 and 'process 1 sent no heartbeat' in errors[0], run.tails()
    assert 'Traceback' not in run.log(0)
    assert survivor_s <= PEER_TIMEOUT_S + 30
  finally:
    run.close()
  assert os.path.isdir(workdir / 'checkpoints' / '2')

  rerun = _launch(workdir, two_process_run['tfds_dir'], tag='restart')
  try:
    assert rerun.wait(RUN_TIMEOUT_S) == [0, 0], rerun.tails()
    assert 'resumed from step 2' in rerun.log(0) and 'resumed from step 2' in rerun.log(1)
  finally:
    rerun.close()
  resumed, _, _ = export.load_checkpoint_adapter(str(workdir))
  assert [m['step'] for m in _metrics(workdir)] == [1, 2, 3, 4]
  equal = jax.tree.map(np.array_equal, resumed, two_process_run['params'])
  assert all(jax.tree.leaves(equal)), 'resumed adapter differs from the uninterrupted run'


def _copy_at_step(src: str, dst, step: int) -> None:
  """`src`'s workdir as it was when checkpoint `step` was its newest."""
  shutil.copytree(src, dst)
  ckpts = os.path.join(dst, train.CHECKPOINT_DIR)
  for name in os.listdir(ckpts):
    if name.isdigit() and int(name) > step:
      shutil.rmtree(os.path.join(ckpts, name))


def test_a_two_process_checkpoint_resumes_on_one_process(two_process_run, tmp_path):
  """2 -> 1: the data position is global (the step), so the resumed run reads the same
  global batches as the uninterrupted 2-process run and ends where it did."""
  workdir = tmp_path / 'to_one'
  _copy_at_step(two_process_run['workdir'], workdir, 2)
  state = train.train_and_evaluate(_config(two_process_run['tfds_dir']), str(workdir))
  multi, resumed = _metrics(two_process_run['workdir']), _metrics(workdir)
  assert [m['step'] for m in resumed] == [1, 2, 3, 4]
  # Steps 3-4 on the batches the 2-process run trained on (another order: other losses).
  np.testing.assert_allclose([m['loss'] for m in resumed[2:]],
                             [m['loss'] for m in multi[2:]], rtol=1e-5)
  assert _max_abs_diff(jax.device_get(state['params']), two_process_run['params']) <= 1e-5


def test_an_elastic_resume_refuses_a_changed_global_batch(two_process_run, tmp_path):
  workdir = tmp_path / 'rebatched'
  _copy_at_step(two_process_run['workdir'], workdir, 2)
  config = _config(two_process_run['tfds_dir'])
  config.data.batch_size = BATCH * 2
  with pytest.raises(train.ConfigError, match=(
      f'was trained with global batch {BATCH}, this run has config.data.batch_size='
      f'{BATCH * 2}')):
    train.train_and_evaluate(config, str(workdir))
  assert os.path.isdir(workdir / train.CHECKPOINT_DIR / '2')  # nothing lost


class _Identity(grain.transforms.Map):

  def map(self, element):
    return element


def test_seek_global_batches_matches_reading_them(tmp_path):
  """The iterator state `seek_global_batches` writes is the one reading gives."""
  config = _config(tmp_path / 'tfds')
  source = list(range(NUM_RECORDS))
  make = lambda: iter(input_pipeline.create_train_loader(
      config, source, None, preprocess=_Identity()))
  read = make()
  for _ in range(3):
    next(read)
  sought = make()
  train.seek_global_batches(sought, 3, BATCH)
  assert json.loads(sought.get_state()) == json.loads(read.get_state())
  np.testing.assert_array_equal(next(sought), next(read))


@pytest.mark.slow  # `make test-slow` (Makefile: the suite's time budget)
def test_a_one_process_checkpoint_resumes_on_two_processes(two_process_run, one_process_run,
                                                           tmp_path):
  """1 -> 2: each process continues at its block of the next global batch."""
  workdir, keys_dir = tmp_path / 'to_two', tmp_path / 'keys'
  keys_dir.mkdir()
  _copy_at_step(one_process_run['workdir'], workdir, 2)
  run = _launch(workdir, two_process_run['tfds_dir'], tag='elastic',
                extra_env={'RC_TEST_KEYS_DIR': str(keys_dir)})
  try:
    assert run.wait(RUN_TIMEOUT_S) == [0, 0], run.tails()
    assert 'was written by 1 process(es), this run has 2' in run.log(0)
  finally:
    run.close()
  for p in range(2):
    with open(keys_dir / f'keys_{p}.jsonl') as f:
      keys = [json.loads(line) for line in f]
    assert keys == two_process_run['keys'][p][2:]  # steps 3 and 4, the same records
  resumed, _, _ = export.load_checkpoint_adapter(str(workdir))
  assert _max_abs_diff(resumed, one_process_run['params']) <= 1e-5


@pytest.mark.parametrize('alone, message', [
    (1, 'error: process 1: cannot reach the coordinator at 127.0.0.1:'),  # no listener
    (0, 'error: process 0: the 2 processes did not all join the coordinator at '),
], ids=['no_coordinator', 'missing_peer'])
def test_a_cluster_that_does_not_form_ends_with_one_line(tmp_path, alone, message):
  run = _launch(tmp_path / 'w', tmp_path / 'tfds', process_ids=[alone],
                flags=['--coordinator_timeout=3'])
  try:
    t0 = time.monotonic()
    codes = run.wait(90)
    seconds = time.monotonic() - t0
  finally:
    run.close()
  print(f'\nonly process {alone} started: exit {codes[0]} after {seconds:.1f}s')
  errors = run.errors(0)
  assert codes == [2] and len(errors) == 1, run.tails()
  assert errors[0].startswith(message)
  assert 'Check failure stack trace' not in run.log(0)


def test_distributed_without_a_cluster_is_a_one_line_error(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')}
  proc = subprocess.run(
      [sys.executable, '-m', 'train.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path}', '--config.mesh.distributed=True'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(env, PYTHONPATH=REPO))
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      'error: config.mesh.distributed is True but no cluster was found: set '
      'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run on a TPU '
      'pod, SLURM or Open MPI, which JAX detects)']


# ---- in-process units ----


@pytest.mark.parametrize('environ, message', [
    ({'JAX_PROCESS_ID': '0'}, 'JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not'),
    ({'JAX_NUM_PROCESSES': 'two', 'JAX_PROCESS_ID': '0'}, 'must be integers'),
    ({'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '2'}, r'must lie in \[0, '),
])
def test_cluster_env_mistakes(environ, message):
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.cluster_from_env(environ)


def test_cluster_env_is_read():
  assert distributed.cluster_from_env({
      'JAX_COORDINATOR_ADDRESS': 'h:1', 'JAX_NUM_PROCESSES': '4', 'JAX_PROCESS_ID': '3'}) == {
          'coordinator_address': 'h:1', 'num_processes': 4, 'process_id': 3}
  assert distributed.cluster_from_env({}) == {}


class _FakeKV:
  """The coordination service's key-value store, in memory."""

  def __init__(self):
    self.data, self.fail = {}, False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.fail:
      raise RuntimeError('UNAVAILABLE: Socket closed\nmore')
    self.data[key] = value

  def key_value_dir_get(self, prefix):
    if self.fail:
      raise RuntimeError('UNAVAILABLE: Socket closed')
    return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


def _watch(monkeypatch, kv, process_id=0, num=3, timeout_s=0.5):
  failures = []
  done = threading.Event()

  def fail(message, code):
    failures.append((message, code))
    done.set()

  monkeypatch.setattr(distributed, '_fail_now', fail)
  dog = distributed.PeerWatchdog(process_id, num, timeout_s, client=kv)
  dog.start()
  return dog, failures, done


def test_watchdog_names_the_silent_peer(monkeypatch):
  kv = _FakeKV()
  dog, failures, done = _watch(monkeypatch, kv)
  kv.data['realcustom_watchdog/done/2'] = '1'  # finished peers are not watched
  stop = threading.Event()

  def peer_1_beats_then_stops():
    for beat in range(3):
      kv.data['realcustom_watchdog/alive/1'] = str(beat)
      time.sleep(0.1)

  threading.Thread(target=peer_1_beats_then_stops).start()
  t0 = time.monotonic()
  assert done.wait(10)
  dog.stop()
  stop.set()
  assert 0.4 < time.monotonic() - t0 < 3
  assert failures == [('process 0: process 1 sent no heartbeat for 0.5s (it died or hangs); '
                       'ending the run', distributed.EXIT_PEER_LOST)]
  assert kv.data['realcustom_watchdog/alive/0'] != '0'  # this process beat too


def test_watchdog_lost_coordinator_and_clean_finish(monkeypatch):
  kv = _FakeKV()
  dog, failures, done = _watch(monkeypatch, kv, process_id=1, num=2, timeout_s=5)
  kv.fail = True
  assert done.wait(10)
  assert failures[0][1] == distributed.EXIT_PEER_LOST
  assert failures[0][0].startswith('process 1: lost the coordinator') and '\n' not in failures[0][0]
  kv = _FakeKV()
  dog, failures, _ = _watch(monkeypatch, kv, process_id=1, num=2, timeout_s=5)
  dog.finish()
  assert kv.data['realcustom_watchdog/done/1'] == '1' and not failures


@pytest.mark.parametrize('num_records, processes, per_process', [(32, 2, 4), (21, 4, 1),
                                                                 (13, 1, 3)])
def test_global_batches_do_not_depend_on_the_process_count(num_records, processes,
                                                           per_process):
  config = _config('')
  config.data.batch_size = processes * per_process
  keys = [[] for _ in range(processes)]

  class Source:
    def __len__(self):
      return num_records

    def __getitem__(self, key):
      return {'image': np.full((2, 2, 3), key, np.uint8), 'caption': b'x'}

  steps = 2 * num_records // config.data.batch_size + 1  # across epoch boundaries
  tokenize = lambda caption: np.zeros(3, np.int32)  # noqa: E731
  for p in range(processes):
    loader = input_pipeline.create_train_loader(
        config, Source(), tokenize, shard_options=grain.sharding.ShardOptions(p, processes))
    it = iter(loader)
    keys[p] = [[int(v) for v in next(it)['image'][:, 0, 0, 0] * 127.5 + 127.5 + 0.5]
               for _ in range(steps)]
  single = iter(input_pipeline.create_train_loader(
      config, Source(), tokenize, shard_options=grain.sharding.ShardOptions(0, 1)))
  for step in range(steps):
    glob = [int(v) for v in next(single)['image'][:, 0, 0, 0] * 127.5 + 127.5 + 0.5]
    assert sum((keys[p][step] for p in range(processes)), []) == glob
  first_epoch = sum((keys[p][s] for s in range(steps) for p in range(processes)), [])
  # Within the first epoch every record once: none twice, none skipped.
  assert sorted(first_epoch[:num_records]) == list(range(num_records))


def test_one_process_data_checkpoints_from_before_still_resume():
  """A data-iterator state written by the plain per-process IndexSampler loader (before
  ProcessBlockSampler) restores into today's loader: grain compares the samplers' reprs."""
  class Source:
    def __len__(self):
      return 20

    def __repr__(self):
      return 'Source'

    def __getitem__(self, key):
      return {'image': np.full((2, 2, 3), key, np.uint8), 'caption': b'x'}

  config = _config('')
  config.data.batch_size = 4
  tokenize = lambda caption: np.zeros(3, np.int32)  # noqa: E731
  shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  before = iter(grain.DataLoader(
      data_source=Source(), shard_options=shard, worker_count=0,
      sampler=grain.samplers.IndexSampler(num_records=20, shard_options=shard, shuffle=True,
                                          num_epochs=None, seed=config.data.shuffle_seed),
      operations=[training_inputs.TrainPreprocess(tokenize),
                  grain.transforms.Batch(batch_size=4, drop_remainder=True)]))
  next(before), next(before)
  state, expected = before.get_state(), next(before)['image']
  now = iter(input_pipeline.create_train_loader(config, Source(), tokenize))
  now.set_state(state)
  np.testing.assert_array_equal(next(now)['image'], expected)
