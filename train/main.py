"""Trains the RealCustom adapter.

  python -m train.main --config=configs/tiny.py --workdir=/tmp/rc_tiny
  python -m train.main --config=configs/laion.py --workdir=gs://.../rc_sd15

Running the same command again resumes from the latest checkpoint in `--workdir`.
On several processes (TPU pods, multi-host GPU) set `--config.mesh.distributed=True`;
every process runs the same command.

Exit status: 0 done, 2 a config mistake (one line on stderr), 1 a NaN/inf loss.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from realcustom_jax import sharding

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and data.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                 lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  config = FLAGS.config
  # Before anything touches a JAX backend.
  sharding.initialize_distributed(config)
  # Imported after the distributed runtime is up: importing train builds nothing, but
  # keeping JAX work after initialize() is what jax.distributed requires.
  from train import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except train.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except train.NonFiniteLossError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
