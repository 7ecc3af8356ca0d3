"""Exports the latest checkpoint's adapter parameters to one safetensors file.

  python -m train.export --workdir=/tmp/rc_tiny --out=adapter.safetensors

The file's metadata holds the training config's `model` section as JSON ('model_config')
and the checkpoint step ('step'); `adapter_lib.load_adapter` reads it back.

A run of the release's architecture (configs/release_train*.py) exports a release-kind
adapter (what `sample.convert_release` writes for the authors' file, so `sample.main
--config=configs/release*.py --adapter=OUT` samples with it) and, unless
--norelease_layout, a second file in the release's own layout: the state-dict keys and
(out, in) shapes of RealCustom_highres.pth, float32, next to OUT as
`<OUT stem>_release.safetensors` (or --release_out), for the authors' torch code:

  unet.load_state_dict(safetensors.torch.load_file('adapter_release.safetensors'),
                       strict=False)
"""
import sys

from absl import app
from absl import flags
import numpy as np
import orbax.checkpoint as ocp

from realcustom_jax.runtime import cli
from realcustom_jax import pipelines

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Training workdir (with checkpoints/).')
flags.DEFINE_string('out', None, 'Destination .safetensors file.')
flags.DEFINE_integer('step', None, 'Checkpoint step to export; default the latest.')
flags.DEFINE_bool('release_layout', True, 'Release runs: also write the adapter under '
                  'the release\'s state-dict keys (RealCustom_highres.pth\'s).')
flags.DEFINE_string('release_out', None, 'Release runs: the release-layout file; default '
                    '<out stem>_release.safetensors.')
flags.mark_flags_as_required(['workdir', 'out'])

CHECKPOINT_DIR = 'checkpoints'  # as train/train.py writes it


def load_checkpoint_adapter(workdir: str, step: int | None = None) -> tuple[dict, int, dict]:
  """Reads (adapter params as NumPy, step, config dict) from a training workdir.

  Raises:
    ValueError: no checkpoint directory, no checkpoint, or no such step.
  """
  ckpt_dir = cli.absolute_path(workdir) / CHECKPOINT_DIR  # URLs (gs://) stay URLs
  if not ckpt_dir.is_dir():
    raise ValueError(f'no checkpoints in {workdir} ({ckpt_dir} does not exist)')
  handlers = {'state': ocp.PyTreeCheckpointHandler(), 'config': ocp.JsonCheckpointHandler()}
  with ocp.CheckpointManager(ckpt_dir, item_handlers=handlers,
                             options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
    steps = mngr.all_steps()
    if not steps:
      raise ValueError(f'no checkpoints in {ckpt_dir}')
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f'no checkpoint for step {step} in {ckpt_dir}; have {sorted(steps)}')
    # Restore as host NumPy arrays: export needs no devices and must not depend on the
    # mesh the run was trained on.
    meta = mngr.item_metadata(step)['state']
    params_meta = dict(getattr(meta, 'tree', meta))['params']
    restore_args = {'params': _numpy_restore_args(params_meta)}
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={'params': params_meta},
                                     restore_args=restore_args, partial_restore=True),
        config=ocp.args.JsonRestore()))
  return restored['state']['params'], step, restored['config']


def _numpy_restore_args(tree):
  if isinstance(tree, dict):
    return {k: _numpy_restore_args(v) for k, v in tree.items()}
  return ocp.RestoreArgs(restore_type=np.ndarray)


def release_layout_path(out: str) -> str:
  """`<out stem>_release.safetensors`: where the release-layout file goes by default."""
  stem = out[:-len('.safetensors')] if out.endswith('.safetensors') else out
  return f'{stem}_release.safetensors'


def export(workdir: str, out: str, step: int | None = None,
           release_out: str | None = None) -> int:
  """Writes the adapter of `step` (default latest) to `out`; returns the step."""
  return export_files(workdir, out, step, release_out)[0]


def export_files(workdir: str, out: str, step: int | None = None,
                 release_out: str | None = None) -> tuple[int, list[str]]:
  """`export`, returning (step, the files written).

  The checkpoint's model family (its config's `pipeline`) writes the file
  (`Family.export`): a release run's as a release-kind adapter, and in the release's own
  key layout to `release_out` when given (a paper run has no such layout and ignores it).
  """
  params, step, config = load_checkpoint_adapter(workdir, step)
  return step, pipelines.family_for(config).export(params, config, out, step, release_out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  cli.quiet_libraries()
  try:
    release_out = None
    if FLAGS.release_layout:
      release_out = FLAGS.release_out or release_layout_path(FLAGS.out)
    step, written = export_files(FLAGS.workdir, FLAGS.out, FLAGS.step, release_out)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'exported step {step} to {FLAGS.out}')
  if release_out in written:
    print(f'the release\'s key layout (RealCustom_highres.pth\'s): {release_out}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('error: '))
