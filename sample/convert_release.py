"""Converts the authors' released RealCustom weights to our safetensors adapter, once.

  python -m sample.convert_release --checkpoint=RealCustom_highres.pth \\
      --out=realcustom_highres.safetensors --allow_pickle

  # the release's config (its image_prompt_settings are checked; SDXL is the default):
  python -m sample.convert_release --checkpoint=RealCustom_highres.pth \\
      --unet_config=RealCustom/configs/realcustom_sigdino_highres.json \\
      --out=realcustom_highres.safetensors --allow_pickle

The `.pth` (`ckpts/realcustom/RealCustom_highres.pth` of the Hugging Face repository
bytedance-research/RealCustom) is a torch pickle: reading it needs torch, and
unpickling can run code, hence --allow_pickle. The output holds every attn2's visual
K/V and the projector (`realcustom_jax.release.convert` gives the key mapping) with metadata
naming the adapter kind, so it loads torch-free into the release model only.

User mistakes (no --allow_pickle, a missing or unreadable file, a checkpoint that lacks
tensors, holds unexpected ones or fits another UNet) end with one line on stderr and exit
status 2.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging

from realcustom_jax.runtime import cli

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, "The release's RealCustom_highres.pth.")
_OUT = flags.DEFINE_string('out', None, 'Destination .safetensors file.')
_ALLOW_PICKLE = flags.DEFINE_bool('allow_pickle', False,
                                  'Read the .pth (a torch pickle: unpickling can run code; '
                                  'needs torch).')
_UNET_CONFIG = flags.DEFINE_string(
    'unet_config', None, "A diffusers unet/config.json or the release's model config "
    '(configs/realcustom_sigdino_highres.json); default: the release\'s SDXL UNet.')
_DIM_HEAD = flags.DEFINE_integer(
    'dim_head', None, "The projector's head width (default: the release config's, else 64).")
_SKIP_BASE = flags.DEFINE_bool(
    'skip_base_weights', False, 'Leave out base UNet tensors found beside the adapter '
    '(the base then comes from the SDXL directory) instead of refusing the file.')
flags.mark_flags_as_required(['checkpoint', 'out'])


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(cli.EXIT_USAGE)


def main(argv) -> None:
  if len(argv) > 1:
    _fail(f'unexpected arguments: {" ".join(argv[1:])}')
  checkpoint = _CHECKPOINT.value
  if not _ALLOW_PICKLE.value:
    _fail(f'--checkpoint={checkpoint} is a torch pickle: unpickling can run code, and '
          'reading it needs torch; pass --allow_pickle if you trust the file')
  if not os.path.isfile(checkpoint):
    _fail(f'--checkpoint={checkpoint}: no such file')
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  if not _OUT.value.endswith('.safetensors'):
    _fail(f'--out={_OUT.value} must end in .safetensors')
  if not os.path.isdir(out_dir):
    _fail(f'--out={_OUT.value}: directory {out_dir} does not exist')
  logging.set_verbosity(logging.WARNING)  # JAX's backend probing is not news here
  cli.quiet_libraries()
  # Heavy imports (JAX, torch) only once the command line is known to be usable.
  from realcustom_jax.release import convert as release  # pylint: disable=g-import-not-at-top
  try:
    info = release.convert_release_checkpoint(
        checkpoint, _OUT.value, allow_pickle=True,
        unet_config=_UNET_CONFIG.value, dim_head=_DIM_HEAD.value,
        skip_base_weights=_SKIP_BASE.value)
  except ValueError as e:  # CheckpointError and the UNet config checks
    _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  print(f'wrote {_OUT.value}: {info["cross_attention_layers"]} attn2 visual K/V pairs, '
        f'projector {info["vision_dim"]} -> {info["out_dim"]} (dim_head {info["dim_head"]}), '
        f'{info["source_dtype"]}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser('error: '))
