"""Prepares the training data set once, before training (needed for multi-host runs).

  python -m train.prepare --config=configs/laion.py --workdir=/ckpt/realcustom \
      --config.data.shards_dir=/data/laion_shards

Converts the webdataset shards of `config.data.shards_dir` (or the generated toy shards
when `config.data.toy`) into the ArrayRecord tfds data set that `train.main` reads,
under `config.data.tfds_data_dir` (default `WORKDIR/tfds`), and prints the counts of
kept and skipped samples. Training prepares it too when it is missing, but every host
would then write it at once: run this on one host first, with the same config and
workdir (or tfds_data_dir) that training gets. A rerun with the same shards does
nothing; shards added since are detected and the set is prepared again.

With `--config.data.precompute_features=True` it then loads the frozen models
(`config.pretrained`, `config.vision_encoder`) and stores the encoders' features of the
set (train/precompute.py), which training would otherwise compute on process 0 while
the other hosts wait. A rerun with the same encoders and settings does nothing.

Exit status: 0 prepared (or already), 2 a flag or config mistake (one line on stderr).
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from realcustom_jax.runtime import cli
from realcustom_jax.loading import components
from train import input_pipeline
from train import laion_builder
from train import precompute

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program: `prepare` is imported by tests and tools whose
  process already has --workdir and --config from another entry point."""
  flags.DEFINE_string('workdir', None, 'The training workdir (the data goes to WORKDIR/tfds '
                      'unless config.data.tfds_data_dir).')
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.',
                                   lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])


def prepare(config, workdir: str) -> tuple[str, dict[str, int]]:
  """Prepares the data set of `config` (no-op if prepared).

  Args:
    config: the training config (reads `resolution` and `data.*`).
    workdir: the training workdir.

  Returns:
    (the prepared data set's directory, its sample counts from `prepare_stats.json`).

  Raises:
    ValueError: a data-config mistake, missing shards, or no sample survived filtering.
  """
  input_pipeline.check_data_config(config)
  data_dir = input_pipeline.tfds_data_dir(config, workdir)
  try:
    data_dir.mkdir(parents=True, exist_ok=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'cannot create the data directory {data_dir}: '
                     f'{getattr(e, "strerror", None) or e}') from None
  if config.data.toy:
    builder = input_pipeline.prepare_toy_dataset(data_dir, config)
  else:
    builder = laion_builder.prepare_dataset(
        config.data.shards_dir, data_dir, config.resolution,
        aesthetic_field=config.data.aesthetic_field,
        min_aesthetic=config.data.min_aesthetic)
  return str(builder.data_dir), laion_builder.read_prepare_stats(builder)


def prepare_features(config, workdir: str) -> precompute.FeatureSource:
  """Stores the frozen encoders' features of the prepared set (no-op if stored).

  Raises:
    ValueError: a config mistake (missing weights, a bad feature dtype) or features
      that cannot be stored as asked.
  """
  precompute.check_config(config)
  sd, vision = components.load_components(config)
  return precompute.get_feature_source(config, workdir, sd, vision)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  cli.quiet_libraries()
  try:
    precompute.check_config(FLAGS.config)  # before hours of image preparation
    path, stats = prepare(FLAGS.config, FLAGS.workdir)
    logging.info('prepared %s', path)
    print(f'{path}: {stats["written"]} samples written, {stats["samples"]} read from '
          f'{stats["shards"]} shards; skipped: '
          + ', '.join(f'{k} {stats[k]}' for k in laion_builder.STAT_KEYS[4:]))
    if precompute.enabled(FLAGS.config):
      features = prepare_features(FLAGS.config, FLAGS.workdir)
      print(f'{features.path}: precomputed features of {len(features)} samples, '
            f'{len(features) * precompute.record_bytes(features.layout) / 1e6:.1f} MB')
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(cli.EXIT_USAGE)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.flags_parser('error: '))
