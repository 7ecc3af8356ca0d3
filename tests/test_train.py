"""Training loop end to end on the tiny config: resume, checkpoints, NaN guard, CLI, export."""
import configparser
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from realcustom_jax import adapter as adapter_lib
from train import export
from train import input_pipeline
from train import train
from tests import testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(data_dir, **train_overrides) -> ml_collections.ConfigDict:
  # One data_dir for the module: the toy set is prepared once for every test.
  train_overrides = dict(dict(num_steps=4, checkpoint_every=2, log_every=1), **train_overrides)
  return testing.toy_train_config(data_dir, 32, 8,
                                  **{f'train.{k}': v for k, v in train_overrides.items()})


def _read_metrics(workdir):
  with open(os.path.join(workdir, train.METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


def _ckpt_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, train.CHECKPOINT_DIR))
                if d.isdigit())


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp('straight'))
  state = train.train_and_evaluate(_config(data_dir), workdir)
  return workdir, jax.device_get(state['params'])


def test_straight_run_writes_checkpoints_and_metrics(straight_run):
  workdir, params = straight_run
  assert _ckpt_steps(workdir) == [2, 4]
  metrics = _read_metrics(workdir)
  assert [m['step'] for m in metrics] == [1, 2, 3, 4]
  assert all(np.isfinite(m['loss']) and m['steps_per_sec'] > 0 for m in metrics)
  events = os.listdir(os.path.join(workdir, train.TENSORBOARD_DIR))
  assert any(e.startswith('events.out.tfevents') for e in events)
  # The adapter moved away from its init (the step-2 checkpoint holds other values).
  at2, _, _ = export.load_checkpoint_adapter(workdir, step=2)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), at2, params))
  assert max(diffs) > 0


def _tensorboard_steps(workdir):
  """The steps TensorBoard shows for 'train/loss', purge markers applied in file order."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  tb_dir = os.path.join(workdir, train.TENSORBOARD_DIR)
  steps = []
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos < len(data):  # TFRecord: length, crc, payload, crc
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      if event.session_log.status == event_pb2.SessionLog.START:
        steps = [s for s in steps if s < event.step]  # what TensorBoard purges
      steps += [event.step for v in event.summary.value if v.tag == 'train/loss']
  return steps


def test_stop_and_resume_is_bit_identical(straight_run, data_dir, tmp_path):
  _, straight = straight_run
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(data_dir, num_steps=3), workdir)
  assert _ckpt_steps(workdir) == [2, 3]
  # A crash after step 3 was logged but before its checkpoint was written.
  shutil.rmtree(os.path.join(workdir, train.CHECKPOINT_DIR, '3'))
  resumed = jax.device_get(train.train_and_evaluate(_config(data_dir), workdir)['params'])
  # Resumed from step 2, not re-run from 0; the replayed step 3 appears once.
  assert [m['step'] for m in _read_metrics(workdir)] == [1, 2, 3, 4]
  assert sorted(_tensorboard_steps(workdir)) == [1, 2, 3, 4]
  chex_equal = jax.tree.map(lambda a, b: np.array_equal(a, b), straight, resumed)
  assert all(jax.tree.leaves(chex_equal)), 'resumed adapter differs from the straight run'


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path)
  with pytest.raises(train.NonFiniteLossError, match=r'at step 3\b'):
    train.train_and_evaluate(_config(data_dir, debug_nan_step=3), workdir)
  assert _ckpt_steps(workdir) == [2]
  assert [m['step'] for m in _read_metrics(workdir)] == [1, 2]


def test_export_matches_checkpoint(straight_run, tmp_path):
  workdir, params = straight_run
  out = str(tmp_path / 'adapter.safetensors')
  assert export.export(workdir, out) == 4
  loaded = adapter_lib.load_adapter(out)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, params)))
  meta = adapter_lib.load_adapter_metadata(out)
  assert meta['step'] == '4'
  assert json.loads(meta['model_config'])['fusion'] == 'timestep'


def test_main_bad_shards_dir_exits_2_with_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'train.main', '--config=configs/tiny.py',
       f'--workdir={tmp_path / "w"}', '--config.data.toy=False',
       f'--config.data.shards_dir={tmp_path / "no_such_dir"}'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'shards_dir' in errors[0] and 'no_such_dir' in errors[0]
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('key, value, message', [
    ('fusion', 'avg', 'config.model.fusion'),
    ('scoring_hidden', -1, 'config.model.scoring_hidden'),
    ('attention_impl', 'flash', 'config.model.attention_impl'),
    ('remat', 'sometimes', 'config.model.remat'),
])
def test_bad_model_keys_are_config_errors(data_dir, tmp_path, key, value, message):
  config = _config(data_dir)
  config.model[key] = value
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def test_bad_visual_kv_init_is_a_config_error(data_dir, tmp_path):
  config = _config(data_dir)
  config.train.visual_kv_init = 'random'
  with pytest.raises(train.ConfigError, match="config.train.visual_kv_init must be one of "
                     r"\('zero_v', 'copy_text'\), got 'random'"):
    train.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize('changes, message', [
    ({'selection_gradient': 'gumbel'}, 'config.train.selection_gradient must be one of'),
    ({'selection_gradient': 'straight_through', 'scoring': 'none'},
     'selection_gradient needs config.model.scoring'),
])
def test_bad_selection_gradient_is_a_config_error(data_dir, tmp_path, changes, message):
  config = _config(data_dir)
  config.train.selection_gradient = changes['selection_gradient']
  if 'scoring' in changes:
    config.model.scoring = changes['scoring']
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


# Shape words of train/synthetic_data.py's captions that the tiny tokenizer keeps whole
# (rows without one get no score loss).
_SUBJECT_WORDS = ('circle',)


@pytest.mark.parametrize('changes, message', [
    ({'train.score_supervision': 'mask'}, 'config.train.score_supervision must be one of'),
    ({'train.score_supervision': 'word_map'}, 'needs config.train.subject_words'),
    ({'train.score_supervision': 'word_map', 'train.subject_words': ('circle', ' ')},
     'needs config.train.subject_words'),
    ({'train.score_supervision': 'word_map', 'train.subject_words': _SUBJECT_WORDS,
      'train.score_supervision_weight': -1.0}, 'score_supervision_weight must be a number'),
    ({'train.score_supervision': 'word_map', 'train.subject_words': _SUBJECT_WORDS,
      'model.scoring': 'none'}, "score_supervision needs config.model.scoring='adaptive'"),
    ({'train.score_supervision': 'word_map', 'train.subject_words': _SUBJECT_WORDS,
      'data.precompute_features': True}, 'set config.data.precompute_features=False'),
])
def test_bad_score_supervision_is_a_config_error(data_dir, tmp_path, changes, message):
  config = _config(data_dir)
  for key, value in changes.items():
    section, name = key.split('.')
    config[section][name] = value
  with pytest.raises(train.ConfigError, match=message):
    train.train_and_evaluate(config, str(tmp_path))


def test_score_supervision_with_a_stored_reference_is_refused(data_dir):
  # (train.main meets the toy set's missing references first; the family check names
  # the supervision's own reason.)
  from realcustom_jax import paper_family  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, score_supervision='word_map', subject_words=_SUBJECT_WORDS)
  config.data.subject_reference = 'stored'
  with pytest.raises(ValueError, match="needs config.data.subject_reference='self': the "
                     'word map locates the subject in the training image'):
    paper_family.check_score_supervision(config)


def test_score_supervision_trains_and_logs_both_losses(data_dir, tmp_path):
  config = _config(data_dir, num_steps=2, checkpoint_every=2, score_supervision='word_map',
                   subject_words=_SUBJECT_WORDS)
  train.train_and_evaluate(config, str(tmp_path))
  metrics = _read_metrics(str(tmp_path))
  assert [m['step'] for m in metrics] == [1, 2]
  for m in metrics:
    assert m['score_loss'] > 0 and np.isfinite(m['diffusion_loss'])
    np.testing.assert_allclose(m['loss'], m['diffusion_loss'] + 0.1 * m['score_loss'],
                               rtol=1e-5)


def test_unusable_workdir_is_a_config_error(data_dir, tmp_path):
  blocker = tmp_path / 'file'
  blocker.write_text('not a directory')
  with pytest.raises(train.ConfigError, match='cannot create --workdir'):
    train.train_and_evaluate(_config(data_dir), str(blocker / 'run'))


def test_finished_run_exits_before_building_anything(straight_run, data_dir, monkeypatch):
  workdir, _ = straight_run
  def no_models(config):
    raise AssertionError('models built for a finished run')
  monkeypatch.setattr(train, 'load_components', no_models)
  assert train.train_and_evaluate(_config(data_dir), workdir) is None


def test_toy_config_with_shards_dir_is_a_config_error(data_dir, tmp_path):
  config = _config(data_dir)
  config.data.shards_dir = str(tmp_path)
  with pytest.raises(train.ConfigError, match='config.data.toy is True'):
    train.validate_config(config)


def test_laion_config_without_weights_names_the_keys():
  from configs import laion  # pylint: disable=g-import-not-at-top
  config = laion.get_config()
  config.data.toy, config.data.shards_dir = True, ''  # only the weights are missing
  with pytest.raises(train.ConfigError, match=r'needs local weights \(configs/laion.py.*'
                     r'--config.pretrained=DIR.*--config.vision_encoder=DIR'):
    train.validate_config(config)


def _unwritable_dir(tmp_path):
  """An existing directory this process cannot write in (root writes through chmod)."""
  if os.geteuid() != 0:
    path = tmp_path / 'read_only'
    path.mkdir()
    path.chmod(0o555)
    return str(path)
  if os.path.isdir('/sys') and _sys_rejects_files():
    return '/sys'
  pytest.skip('no unwritable directory available to root here')


def _sys_rejects_files():
  try:
    open('/sys/.realcustom_probe', 'w').close()
  except OSError:
    return True
  os.remove('/sys/.realcustom_probe')
  return False


def test_existing_unwritable_workdir_is_a_config_error(tmp_path):
  workdir = _unwritable_dir(tmp_path)
  with pytest.raises(train.ConfigError, match='is not writable'):
    train.check_workdir(workdir)


def test_url_workdir_reaches_orbax_and_the_builder_unchanged(data_dir, monkeypatch):
  seen = {}

  class _Manager:
    def __init__(self, directory, **kwargs):
      seen['orbax'] = os.fspath(directory)

  def _prepare(shards_dir, tfds_dir, *args, **kwargs):
    seen['builder'] = (shards_dir, os.fspath(tfds_dir))
    raise RuntimeError('stop here')

  monkeypatch.setattr(train.ocp, 'CheckpointManager', _Manager)
  train.checkpoint_manager('gs://bucket/run', _config(data_dir))
  assert seen['orbax'] == 'gs://bucket/run/checkpoints'

  monkeypatch.setattr(input_pipeline.laion_builder, 'prepare_dataset', _prepare)
  monkeypatch.setattr(input_pipeline.laion_builder, 'list_shards', lambda d: [d + '/0.tar'])
  config = _config(data_dir)
  config.data.toy, config.data.shards_dir = False, 'gs://bucket/shards'
  config.data.tfds_data_dir = ''
  with pytest.raises(RuntimeError, match='stop here'):
    input_pipeline.get_data_source(config, 'gs://bucket/run')
  assert seen['builder'] == ('gs://bucket/shards', 'gs://bucket/run/tfds')


def _run_main(*args):
  return subprocess.run(
      [sys.executable, '-m', 'train.main', '--config=configs/tiny.py', *args],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO))


def test_main_config_key_typo_exits_2_with_the_suggestion(tmp_path):
  proc = _run_main(f'--workdir={tmp_path}', '--config.train.num_step=5')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: --config.train.num_step: the config has no key 'num_step' "
      "(did you mean 'num_steps'?)"]


def test_tensorboard_is_an_install_extra_and_the_readme_says_so():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(REPO, 'setup.cfg'))
  assert 'tensorboard' in setup['options.extras_require']['tensorboard']
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  assert readme.startswith('# ')  # the title comes first, before any code block
  assert ".[tensorboard]" in readme


def _truncate_largest_file(step_dir):
  """Cuts the step's array data files to 100 bytes (what a crash during a copy leaves).

  Every data file: OCDBT keeps more than one, and which one holds a given array is up
  to its hashing, so cutting only the largest does not always hit one that is read.
  """
  files = [os.path.join(d, f) for d, _, names in os.walk(step_dir) for f in names
           if os.path.basename(d) == 'd']
  assert files, f'no OCDBT data files under {step_dir}'
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(100)


def test_damaged_newest_checkpoint_falls_back_to_the_last_good_one(data_dir, tmp_path,
                                                                   caplog):
  straight = jax.device_get(train.train_and_evaluate(
      _config(data_dir, num_steps=6), str(tmp_path / 'straight'))['params'])
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(_config(data_dir, num_steps=4), workdir)
  ckpt = os.path.join(workdir, train.CHECKPOINT_DIR)
  _truncate_largest_file(os.path.join(ckpt, '4'))  # what a crash during a copy leaves
  # 'stop' refuses with one line naming the step, and loses nothing.
  with pytest.raises(train.ConfigError, match=r'checkpoint 4 in .* does not restore'):
    train.train_and_evaluate(_config(data_dir, num_steps=6, on_damaged_checkpoint='stop'),
                             workdir)
  assert _ckpt_steps(workdir) == [2, 4]
  with caplog.at_level('WARNING'):
    resumed = jax.device_get(train.train_and_evaluate(
        _config(data_dir, num_steps=6), workdir)['params'])
  assert any('checkpoint 4 does not restore' in r.getMessage() and '4.damaged' in r.getMessage()
             for r in caplog.records)
  assert os.path.isdir(os.path.join(ckpt, '4' + train.DAMAGED_SUFFIX))  # kept, not deleted
  assert _ckpt_steps(workdir) == [2, 4, 6]  # steps 3-6 trained again from step 2
  same = jax.tree.map(lambda a, b: np.array_equal(a, b), straight, resumed)
  assert all(jax.tree.leaves(same)), 'the fallback run differs from the straight run'


def test_no_checkpoint_that_restores_is_one_config_error(data_dir, tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(_config(data_dir, num_steps=2), workdir)
  _truncate_largest_file(os.path.join(workdir, train.CHECKPOINT_DIR, '2'))
  with pytest.raises(train.ConfigError, match='no checkpoint in .* restores'):
    train.train_and_evaluate(_config(data_dir, num_steps=4), workdir)
  with pytest.raises(train.ConfigError, match='on_damaged_checkpoint must be one of'):
    train.train_and_evaluate(_config(data_dir, on_damaged_checkpoint='ignore'), workdir)


def test_sigterm_saves_at_the_current_step_and_the_restart_loses_nothing(data_dir, tmp_path,
                                                                          caplog):
  import signal  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  metrics = os.path.join(workdir, train.METRICS_FILE)

  def notice():  # the preemption notice, once a few steps have run
    deadline = time.time() + 120
    while time.time() < deadline:
      if os.path.isfile(metrics) and len(open(metrics).read().splitlines()) >= 3:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.05)

  threading.Thread(target=notice, daemon=True).start()
  with caplog.at_level('WARNING'):
    state = train.train_and_evaluate(
        _config(data_dir, num_steps=100000, checkpoint_every=100000), workdir)
  stopped = int(jax.device_get(state['step']))
  assert 3 <= stopped < 100000
  assert _ckpt_steps(workdir) == [stopped]  # saved at the step it stopped, not before
  assert any(f'preempted (SIGTERM): saved a checkpoint at step {stopped}' in r.getMessage()
             for r in caplog.records)
  assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back
  resumed = jax.device_get(train.train_and_evaluate(
      _config(data_dir, num_steps=stopped + 2), workdir)['params'])
  straight = jax.device_get(train.train_and_evaluate(
      _config(data_dir, num_steps=stopped + 2), str(tmp_path / 'straight'))['params'])
  same = jax.tree.map(lambda a, b: np.array_equal(a, b), straight, resumed)
  assert all(jax.tree.leaves(same)), 'the resumed run differs from the straight run'
  assert [m['step'] for m in _read_metrics(workdir)] == list(range(1, stopped + 3))


def test_a_failed_save_stops_with_one_line_and_keeps_the_previous_checkpoint(
    straight_run, data_dir, tmp_path, monkeypatch):
  import errno  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  _, straight = straight_run
  workdir = str(tmp_path)
  real_save = ocp.CheckpointManager.save

  def disk_full_at_step_4(self, step, *args, **kwargs):
    if step == 4:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', disk_full_at_step_4)
  with pytest.raises(train.CheckpointSaveError,
                     match=r'saving step 4 failed \(OSError: .*No space left.*Latest '
                           r'complete checkpoint: step 2'):
    train.train_and_evaluate(_config(data_dir), workdir)
  assert _ckpt_steps(workdir) == [2]
  monkeypatch.setattr(ocp.CheckpointManager, 'save', real_save)  # space freed
  resumed = jax.device_get(train.train_and_evaluate(_config(data_dir), workdir)['params'])
  same = jax.tree.map(lambda a, b: np.array_equal(a, b), straight, resumed)
  assert all(jax.tree.leaves(same)), 'the resumed run differs from the straight run'
