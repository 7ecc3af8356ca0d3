"""realcustom_jax.runtime.cli: flag mistakes as one line, config checks, URL-safe paths."""
import os

from absl import flags
import pytest

from configs import tiny
from realcustom_jax.runtime import cli


def _lookup_error(config, path):
  """The error ml_collections raises for an unknown key: what the flag parser passes on."""
  with pytest.raises((AttributeError, KeyError)) as info:
    node = config
    for key in path.split('.'):
      node = getattr(node, key)
  return info.value


def test_key_typo_keeps_the_suggestion():
  error = _lookup_error(tiny.get_config(), 'train.num_step')
  argv = ['prog', '--config=configs/tiny.py', '--config.train.num_step=5']
  assert cli.flag_error_message(error, argv) == (
      "--config.train.num_step: the config has no key 'num_step' "
      "(did you mean 'num_steps'?)")


def test_unknown_section_and_flag_errors_are_one_line():
  error = _lookup_error(tiny.get_config(), 'nope')
  assert cli.flag_error_message(error, ['prog', '--config.nope.x=1']) == (
      "--config.nope.x: the config has no key 'nope'")
  error = flags.IllegalFlagValueError(
      "flag --config.train.num_steps=abc: invalid literal for int() with base 10: 'abc'")
  assert cli.flag_error_message(error, ['prog']) == str(error)
  error = flags.IllegalFlagValueError(
      'flag --config=c.py: Error whilst parsing config file:\nTraceback ...\n'
      '  File "c.py"\nValueError: boom')
  assert cli.flag_error_message(error, ['prog']) == (
      'flag --config=c.py: Error whilst parsing config file: ValueError: boom')


def test_missing_config_file_message():
  error = OSError('Failed loading config file config_config\n  Attempted [Relative path]:'
                  "\n    c.py\n      [Errno 2] No such file or directory: 'c.py'")
  assert cli.flag_error_message(error, ['prog']) == (
      "cannot load the config file: [Errno 2] No such file or directory: 'c.py'")


@pytest.mark.parametrize('url', ['gs://bucket/run', 's3://b/x/y'])
def test_absolute_path_keeps_urls(url):
  assert os.fspath(cli.absolute_path(url)) == url
  assert os.fspath(cli.absolute_path(url) / 'checkpoints') == url + '/checkpoints'


def test_absolute_path_makes_local_paths_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(cli.absolute_path('run')) == str(tmp_path / 'run')


_CACHE_PROBE = '''
import sys
from absl import flags
from realcustom_jax.runtime import cli
import jax
cli.define_compile_cache_flags()
flags.FLAGS(sys.argv)
print(cli.enable_compile_cache(), jax.config.jax_enable_compilation_cache,
      jax.config.jax_persistent_cache_min_compile_time_secs)
'''


@pytest.mark.parametrize('args, env, want', [
    ([], {'XDG_CACHE_HOME': '/tmp/xdg'}, '/tmp/xdg/realcustom_jax/xla True 0.0'),
    ([], {'JAX_COMPILATION_CACHE_DIR': '/tmp/env_cache'}, '/tmp/env_cache True'),
    (['--compile_cache_dir=/tmp/flag_cache'], {}, '/tmp/flag_cache True'),
    (['--nocompile_cache'], {}, 'None False'),
])
def test_clis_keep_a_compile_cache_unless_told_not_to(args, env, want):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  base = {k: v for k, v in os.environ.items()
          if k not in ('JAX_COMPILATION_CACHE_DIR', 'XDG_CACHE_HOME',
                       'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS')}
  proc = subprocess.run([sys.executable, '-c', _CACHE_PROBE, *args], env={**base, **env},
                        capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-1000:]
  assert proc.stdout.strip().startswith(want), proc.stdout


def test_skip_torch_keeps_torch_out_of_the_sampling_cli():
  """sample.main reads torch-free formats: diffusers must not pull torch in (3 s a call)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  probe = ('import sys\nfrom realcustom_jax.runtime import cli\ncli.skip_torch()\n'
           'from realcustom_jax import pipelines\nfrom realcustom_jax.loading import tiny\n'
           'from configs import tiny as c\ntiny.build_tiny_components(c.get_config())\n'
           'print(sys.modules["torch"])')
  proc = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                        timeout=180, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        env={k: v for k, v in os.environ.items() if k != 'USE_TORCH'})
  assert proc.returncode == 0, proc.stderr[-1000:]
  assert proc.stdout.strip() == 'None'
