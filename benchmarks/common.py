"""What both benchmarks share: the architectures, cheap random weights, the CLI ending."""
import json
import sys
from typing import Any, Callable, NamedTuple

from absl import logging

import jax
import jax.numpy as jnp

from realcustom_jax import model as model_lib
from realcustom_jax.loading import tiny
from realcustom_jax.runtime import cli

# SD 1.5's UNet (stable-diffusion-v1-5 unet/config.json, the fields we use).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, use_linear_projection=False)


class Arch(NamedTuple):
  unet: dict  # diffusers UNet config
  latent: tuple[int, int, int]  # (C, H, W)
  text: tuple[int, int]  # (tokens, width)
  image: tuple[int, int]  # (tokens, width)


def arch(config, name: str) -> Arch:
  """'sd15': SD 1.5 at 512 px with CLIP ViT-L/14 tokens; 'tiny': the config's tiny models."""
  if name == 'sd15':
    return Arch(SD15_UNET, (4, 64, 64), (77, 768), (256, 1024))
  unet = dict(config.tiny.unet)
  vision = tiny.vision_config(config)
  side = unet['sample_size']
  return Arch(unet, (unet['in_channels'], side, side), (77, unet['cross_attention_dim']),
              ((vision.image_size // vision.patch_size) ** 2, vision.hidden_size))


def build_model(config, a: Arch, **model_overrides) -> model_lib.RealCustom:
  """`model_lib.build_model` over the arch's UNet, with `config.model` keys overridden
  (the benchmarks' --dtype, --attention_impl, --remat)."""
  config = config.copy_and_resolve_references()
  with config.ignore_type():  # e.g. a bool remat in a config given a policy name
    config.model.update(model_overrides)
  return model_lib.build_model(config, a.unet)


def random_params(model: model_lib.RealCustom, a: Arch, seed: int = 0) -> Any:
  """Random weights of the right shapes without running (or compiling) `model.init`.

  An SD 1.5 init traces and compiles the whole forward pass; timing needs only weights
  of the right shapes and a sane scale: kernels ~ N(0, 1/fan_in), norm scales 1,
  biases 0. The shapes come from `jax.eval_shape`, which costs no FLOPs, and the values
  from NumPy on the host: drawing them in one jitted function (a draw per leaf, or one
  flat draw sliced into the ~700 leaves) took XLA:GPU over four minutes to compile.
  """
  c, h, w = a.latent
  shapes = jax.eval_shape(lambda r: model.init(
      r, jnp.zeros((1, c, h, w)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,) + a.text),
      jnp.zeros((1,) + a.image), sqrt_alpha_bar=jnp.ones((1,)),
      scope_mask=jnp.ones((1, h, w)))['params'], jax.random.PRNGKey(0))
  return tiny.host_random_params(shapes, seed)


def flops(stage) -> float:
  """FLOPs from XLA's cost analysis of a lowered or compiled computation (0 if none)."""
  try:
    cost = stage.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends have none
    return 0.0
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per program
    cost = cost[0]
  return float(cost.get('flops', 0.0)) if cost else 0.0


def cpu_lowering_flops(fn: Callable, *args) -> float:
  """FLOPs of `fn(*args)` as lowered for the CPU (shapes only: nothing is copied).

  JAX 0.11 gives no cost analysis of a lowered GPU program, and after XLA's passes a
  GPU count leaves out the work handed to cuBLAS / cuDNN: the CPU lowering counts what
  the program computes on any backend. Build `fn`'s model with XLA attention (a fused
  kernel is an opaque call here too).
  """
  on_cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x),
                                                       sharding=on_cpu), args)
  return flops(jax.jit(fn).lower(*shapes))


def fused_attention_calls(lowered) -> int:
  """Fused attention kernels in a lowered program (cuDNN fMHA or Pallas TPU calls): that
  the fused path is the one taken, as compiled."""
  text = lowered.as_text()
  return text.count('__cudnn$fmha') + text.count('tpu_custom_call')


def report(argv: list[str], compute: Callable[[], dict]) -> None:
  """A benchmark's `main`: runs `compute` and prints its result as the last line (JSON).

  Bad arguments, and any ValueError `compute` raises for a bad flag, end in a one-line
  error and exit status 2. Compile times are part of the reports, so the persistent
  compilation cache is turned off first: they time real compiles, not cache hits.
  """
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  cli.quiet_libraries()
  logging.set_verbosity(logging.INFO)
  jax.config.update('jax_enable_compilation_cache', False)  # before the first compile
  try:
    result = compute()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(json.dumps(result), flush=True)
