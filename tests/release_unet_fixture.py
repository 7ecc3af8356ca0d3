"""The release UNet fixture (tests/fixtures/release_unet/, see its make_fixtures.py) as
the tests use it: the base UNet written back as a diffusers `unet/` folder, read by our
loader, and the release's `.pth` converted by our converter."""
import os
import shutil

import numpy as np
import safetensors.numpy

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'release_unet')
CHECKPOINT = os.path.join(FIXTURE, 'realcustom_adapter.pth')
RELEASE_CONFIG = os.path.join(FIXTURE, 'release_config.json')
UNET_CONFIG = os.path.join(FIXTURE, 'unet_config.json')
DIM_HEAD = 16  # the projector's head width in release_config.json


def data() -> dict[str, np.ndarray]:
  """Inputs and the release UNet's outputs (release_unet.npz)."""
  with np.load(os.path.join(FIXTURE, 'release_unet.npz')) as z:
    return dict(z)


def write_unet_dir(folder: str) -> str:
  """A diffusers `unet/` folder (config.json + safetensors) under `folder`."""
  unet_dir = os.path.join(folder, 'unet')
  os.makedirs(unet_dir, exist_ok=True)
  shutil.copy(UNET_CONFIG, os.path.join(unet_dir, 'config.json'))
  with np.load(os.path.join(FIXTURE, 'unet_state.npz')) as z:
    safetensors.numpy.save_file(dict(z), os.path.join(unet_dir,
                                                      'diffusion_pytorch_model.safetensors'))
  return unet_dir


def release_state() -> dict[str, np.ndarray]:
  """The fixture `.pth` as NumPy (needs torch)."""
  import torch  # pylint: disable=g-import-not-at-top
  state = torch.load(CHECKPOINT, map_location='cpu', weights_only=True)
  return {k: v.numpy() for k, v in state.items()}


def save_release_state(state: dict[str, np.ndarray], path: str, dtype=None) -> str:
  """Writes a state dict as the release does (`torch.save`), optionally recast."""
  import torch  # pylint: disable=g-import-not-at-top
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  if dtype is not None:
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
  torch.save(tensors, path)
  return path


def build_model(folder: str):
  """(release model, base UNet params, adapter params) of the fixture, float32: the
  base through our diffusers loader, the `.pth` through our converter (needs torch)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from realcustom_jax.release import convert as release  # pylint: disable=g-import-not-at-top
  from realcustom_jax import adapter as adapter_lib  # pylint: disable=g-import-not-at-top
  from realcustom_jax.loading import weights  # pylint: disable=g-import-not-at-top
  unet_config, base = weights.load_unet(
      write_unet_dir(folder), False, jnp.float32, sdxl=True)
  path = os.path.join(folder, 'adapter.safetensors')
  release.convert_release_checkpoint(CHECKPOINT, path, allow_pickle=True,
                                     unet_config=RELEASE_CONFIG)
  model = release.build_release_model(unet_config, adapter_lib.load_adapter_metadata(path))
  adapter, _ = release.load_release_adapter(path, model)
  return model, base, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), adapter)
