"""Where the release's files are: import-free.

The command-line entry points read this before JAX, diffusers or torch are imported
(to fail fast on a missing file, and to know whether the tiny release's `.pth` must be
written, which needs torch), so it imports nothing of the library.
"""
import hashlib
import json
import os


# Written last into a tiny release directory (`realcustom_jax.release.tiny`), read by `is_written`.
TINY_RELEASE_DONE = 'tiny_release.json'
_TINY_RELEASE_VERSION = 1  # bump when tiny_release writes different files


def tiny_release_dir(config) -> str | None:
  """Where a tiny release config's files go; None when the config names real weights.

  `config.tiny_release.dir`, else ~/.cache/realcustom_jax/release_tiny/<hash of the
  sizes> (cheap: no JAX, so the CLIs can decide early whether they need torch).
  """
  if config.get('pretrained', '') or 'tiny_release' not in config:
    return None
  sizes = dict(config.tiny_release)
  folder = sizes.pop('dir', '')
  if folder:
    return os.fspath(folder)
  key = json.dumps(dict(sizes, version=_TINY_RELEASE_VERSION), sort_keys=True, default=list)
  root = os.environ.get('XDG_CACHE_HOME', os.path.join(os.path.expanduser('~'), '.cache'))
  return os.path.join(root, 'realcustom_jax', 'release_tiny',
                      hashlib.sha256(key.encode()).hexdigest()[:12])


def release_paths_message(config) -> str | None:
  """One line naming what a release config (`config.pipeline == 'release'`) for real
  weights lacks or names wrongly, else None; cheap (no JAX), for the CLIs' early checks.

  A config with a `tiny_release` section and no `pretrained` writes its own files.
  """
  if not config.get('pretrained', '') and 'tiny_release' in config:
    return None
  keys = (('pretrained', 'the SDXL base diffusers directory'),
          ('vision_encoder', 'the directory holding the two timm ViT folders'),
          ('adapter', 'the converted RealCustom_highres .safetensors file'))
  missing = [f'--{k} ({what})' for k, what in keys if not config.get(k, '')]
  if missing:
    return f'the release pipeline needs {", ".join(missing)}'
  for key in ('pretrained', 'vision_encoder'):
    if not os.path.isdir(config[key]):
      return f'--{key}={config[key]}: no such directory'
  if not os.path.isfile(config.adapter):
    return f'--adapter={config.adapter}: no such file'
  return None


def tiny_release_pending(config) -> bool:
  """Whether using a release config first writes the tiny release's `.pth` (which needs
  torch); `pipelines.needs_torch` asks it for release configs only."""
  folder = tiny_release_dir(config)
  return bool(folder) and not os.path.isfile(os.path.join(folder, TINY_RELEASE_DONE))
