"""Tiny random stand-ins for every file the authors' release needs, written to disk.

`write_tiny_release(path)` lays out what a user downloads and converts, at toy sizes:

  path/sdxl/                       a diffusers SDXL directory (`tiny_sdxl.write_tiny_sdxl`)
  path/vision/<two timm dirs>/     config.json + model.safetensors, timm's hub layout
                                   (`release_encoder` module docstring)
  path/realcustom_tiny.pth         the release's adapter as `torch.save` writes it:
                                   every attn2's to_k_vision / to_v_vision and the
                                   projector, under the release's state-dict names
  path/adapter.safetensors         that .pth converted by `release.convert_release_checkpoint`,
                                   the converter users run on RealCustom_highres.pth

so configs/release_tiny.py runs the release pipeline end to end (loaders, converter,
encoders, sampler, VAE) on a CPU with nothing downloaded. Writing the .pth needs torch
(the converter reads it with torch, as it reads the real one); nothing after does.
"""
import json
import math
import os
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from realcustom_jax.release import paths as release_paths
from realcustom_jax.release import convert as release
from realcustom_jax.release import encoder as release_encoder
from realcustom_jax.release import projector as release_projector
from realcustom_jax.loading import tiny
from realcustom_jax.release import tiny_sdxl
from realcustom_jax import unet as unet_lib
from realcustom_jax.release import vit

# The two ViTs at toy sizes (the release: 1152 / 1024 wide, 27 / 24 blocks, 384 px).
DEFAULT_VISION = dict(image_size=28, embed_dim=32, depth=2, num_heads=2, layers=(1,))
DEFAULT_PROJECTOR_DIM_HEAD = 16  # 64-wide features: 4 heads (the release: 34 of 64)


def settings(sizes: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The sizes `write_tiny_release` uses: DEFAULT_VISION and the projector head width,
  updated by `sizes` (e.g. `config.tiny_release` without 'dir'), plus tiny_sdxl.SDXL_UNET."""
  sizes = dict(sizes or {})
  vision = dict(DEFAULT_VISION, **{k: v for k, v in sizes.items() if k in DEFAULT_VISION})
  vision['layers'] = tuple(vision['layers'])
  return dict(vision=vision, dim_head=int(sizes.get('dim_head', DEFAULT_PROJECTOR_DIM_HEAD)),
              seed=int(sizes.get('seed', 0)), unet=tiny_sdxl.SDXL_UNET)


def paths(path: str) -> dict[str, str]:
  """Where `write_tiny_release(path)` puts the SDXL dir, vision dir and adapter."""
  return dict(sdxl=os.path.join(path, 'sdxl'), vision=os.path.join(path, 'vision'),
              pth=os.path.join(path, 'realcustom_tiny.pth'),
              adapter=os.path.join(path, 'adapter.safetensors'))


def is_written(path: str) -> bool:
  return os.path.isfile(os.path.join(path, release_paths.TINY_RELEASE_DONE))


def _timm_config(architecture: str, tag: str, v: Mapping[str, Any], mean, std) -> dict:
  size = int(v['image_size'])
  return {
      'architecture': architecture, 'num_classes': 0, 'num_features': v['embed_dim'],
      'model_args': dict(num_classes=0, img_size=[size, size], embed_dim=v['embed_dim'],
                         depth=v['depth'], num_heads=v['num_heads'], in_chans=3),
      'pretrained_cfg': dict(tag=tag, input_size=[3, size, size], mean=list(mean),
                             std=list(std), num_classes=0, license='apache-2.0'),
  }


def _random_timm_state(shapes: Mapping[str, tuple[int, ...]], seed: int
                       ) -> dict[str, np.ndarray]:
  """Norm scales 1, biases 0, layer scales 0.1, matrices ~ N(0, 1/fan_in), tokens 0.02."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, shape in sorted(shapes.items()):
    if name.endswith('.bias'):
      value = np.zeros(shape)
    elif name.endswith('.gamma'):
      value = np.full(shape, 0.1)
    elif len(shape) == 1:
      value = np.ones(shape)
    elif name in ('pos_embed', 'cls_token', 'reg_token'):
      value = 0.02 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / math.sqrt(math.prod(shape[1:]))
    state[name] = value.astype(np.float32)
  return state


def write_vision_dirs(path: str, vision: Mapping[str, Any], seed: int) -> str:
  """The two timm ViT directories at toy sizes under `path`."""
  specs = ((release_encoder.SIGLIP_DIR, 'webli', (0.5,) * 3, (0.5,) * 3),
           (release_encoder.DINO_DIR, 'lvd142m', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
  for i, (folder, tag, mean, std) in enumerate(specs):
    out = os.path.join(path, folder)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, vit.CONFIG_FILE), 'w') as f:
      json.dump(_timm_config(folder, tag, vision, mean, std), f, indent=2)
    _, config, _ = vit.read_timm_config(out)
    safetensors.numpy.save_file(_random_timm_state(vit.timm_state_shapes(config), seed + i),
                                os.path.join(out, vit.WEIGHTS_FILE))
  return path


def release_state(unet_config: Mapping[str, Any], vision_dim: int, dim_head: int,
                  seed: int) -> dict[str, np.ndarray]:
  """A random adapter under the release's state-dict names (what its .pth holds)."""
  unet = unet_lib.RealCustomUNet.from_config(unet_config)
  rng = np.random.default_rng(seed)
  state = {}
  for layer in release.attn2_layers(unet):
    for name in release.VISION_KV.values():
      shape = (layer.width, unet.cross_attention_dim)
      state[f'{layer.torch_prefix}.{name}.weight'] = (
          rng.standard_normal(shape) / math.sqrt(shape[1])).astype(np.float32)
  projector = release_projector.SubjectProjector(vision_dim, unet.cross_attention_dim, dim_head)
  x = jnp.zeros((1, 1, vision_dim))
  shapes = jax.eval_shape(projector.init, jax.random.PRNGKey(0), x, x)['params']
  state.update(release.projector_to_torch_state(tiny.host_random_params(shapes, seed + 1)))
  return state


def write_tiny_release(path: str, sizes: Mapping[str, Any] | None = None) -> dict[str, str]:
  """Writes (or finds already written) the tiny release files under `path`.

  Args:
    path: the directory (created).
    sizes: overrides of `settings` (vision image_size, embed_dim, depth, num_heads,
      layers; dim_head; seed).

  Returns:
    `paths(path)`.

  Raises:
    ValueError: torch is not installed (the .pth is a torch pickle).
  """
  where = paths(path)
  if is_written(path):
    return where
  s = settings(sizes)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError('writing the tiny release .pth needs torch (pip install torch), as '
                     'converting the real RealCustom_highres.pth does') from None
  os.makedirs(path, exist_ok=True)
  for folder in (where['sdxl'], where['vision']):
    shutil.rmtree(folder, ignore_errors=True)
  tiny_sdxl.write_tiny_sdxl(where['sdxl'], seed=s['seed'], unet=s['unet'])
  write_vision_dirs(where['vision'], s['vision'], s['seed'] + 10)
  vision_dim = 2 * int(s['vision']['embed_dim'])
  state = release_state(s['unet'], vision_dim, s['dim_head'], s['seed'] + 20)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, where['pth'])
  release.convert_release_checkpoint(
      where['pth'], where['adapter'], allow_pickle=True,
      unet_config=os.path.join(where['sdxl'], 'unet', 'config.json'), dim_head=s['dim_head'])
  with open(os.path.join(path, release_paths.TINY_RELEASE_DONE), 'w') as f:
    json.dump(s, f, indent=2, default=list)
  return where
