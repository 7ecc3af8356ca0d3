"""Trains the RealCustom adapter.

  python -m train.main --config=configs/tiny.py --workdir=/tmp/rc_tiny
  python -m train.main --config=configs/laion.py --workdir=gs://.../rc_sd15

Running the same command again resumes from the latest checkpoint in `--workdir`.
On several processes (TPU pods, multi-host GPU) set `--config.mesh.distributed=True`;
every process runs the same command (README, "Training on a pod"). Off TPU/SLURM/Open
MPI, name the cluster in the environment of each process:

  JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \
      python -m train.main --config=configs/tiny.py --workdir=/shared/run \
      --config.mesh.distributed=True

Exit status: 0 done (or nothing left to do), 2 a flag or config mistake (one line on
stderr, before any model is built) or a cluster that did not form within
--coordinator_timeout, 1 a NaN/inf loss or a peer process that died or hung (silent for
--peer_timeout).
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from realcustom_jax.runtime import cli
from realcustom_jax.runtime import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and data.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                 lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
cli.define_compile_cache_flags()
flags.DEFINE_float('coordinator_timeout', 300, 'Multi-process runs: seconds for every '
                   'process to join the coordinator before the run ends (exit 2).')
flags.DEFINE_float('peer_timeout', 60, 'Multi-process runs: seconds a peer may go without '
                   'a heartbeat before the run ends (exit 1).')


def _exit(code: int, multi_process: bool) -> None:
  if multi_process:
    # Skip jax.distributed.shutdown at exit: its barrier would wait (minutes) for peers
    # that carry on; they stop on their own when this process's heartbeats stop.
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  config = FLAGS.config
  cli.enable_compile_cache()  # before the first compile
  cli.quiet_libraries()
  # Before anything touches a JAX backend.
  try:
    watchdog = distributed.initialize_distributed(
        config, init_timeout_s=FLAGS.coordinator_timeout, peer_timeout_s=FLAGS.peer_timeout)
  except distributed.DistributedError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  multi_process = watchdog is not None
  # Imported after the distributed runtime is up: importing train builds nothing, but
  # keeping JAX work after initialize() is what jax.distributed requires.
  from train import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except train.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(2, multi_process)
  except (train.NonFiniteLossError, train.CheckpointSaveError) as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    _exit(1, multi_process)
  except BaseException as e:
    if watchdog is not None:
      if isinstance(e, jax.errors.JaxRuntimeError):
        # Most often a collective whose peer died: the watchdog names the peer in one
        # line and ends this process; any other error keeps its traceback.
        watchdog.wait_for_verdict()
      watchdog.stop()  # peers end within --peer_timeout instead of waiting on this one
    raise
  if watchdog is not None:
    watchdog.finish()  # peers stop watching this process; shutdown waits for them


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('error: '))
