"""The authors' released RealCustom model (`RealCustom_highres.pth`) in our parameter tree.

The release (`bytedance/RealCustom`, `configs/realcustom_sigdino_highres.json`) is SDXL
with, in every attn2, a bias-free `to_k_vision` / `to_v_vision` pair over the projected
subject tokens (`models/attention_processor_custom_cross.py`,
`AttnProcessor2_0_image_prompt`, image_prompt_mode 'naive'), and one projector,
`encoder_hidden_states_vision_projection` (`ProjectorHighResMinAttn`), applied once per
UNet call to the subject encoder's (global, local) features. Its pipeline loads the
file with `unet.load_state_dict(torch.load(path), strict=False)`, so the keys are the
custom UNet's state-dict names.

Our model of it is `release.model.ReleaseRealCustom` (`build_release_model`): the
paper's `model.RealCustom` with no scoring and the release's projector; the same UNet, our attn2's to_k_visual /
to_v_visual holding the release's to_k_vision / to_v_vision (both bias-free, input width
cross_attention_dim, scale 1/sqrt(head width), the visual output summed with the text
output before to_out, gated by the bilinearly resized mask), and `subject_projector`
holding the release's projector.

Key mapping (torch `weight` (out, in) -> flax `kernel` (in, out)):

  down_blocks.I.attentions.J.transformer_blocks.K.attn2.to_k_vision.weight
      -> unet/down_blocks_I/attentions_J/transformer_blocks_K/attn2/to_k_visual/kernel
  mid_block.attentions.0..., up_blocks.I.attentions.J...  likewise
  encoder_hidden_states_vision_projection.<name>
      -> subject_projector/... (`release_encoder.projector_from_torch_state`)

The mask: the release resizes it per layer with `F.interpolate(mask,
scale_factor=layer_h / mask_h, mode='bilinear')`, one factor for both axes; our
`attention.resize_scope` resizes to the layer's (h, w). The two agree (tested) whenever
both axes scale alike, as at every image side that is a multiple of 32 px (1024 x 1024,
1024 x 768). At sides that are odd multiples of 16 px the release samples the width of
the quarter-latent layers with the height's factor (e.g. 1040 x 1024: mask values up to
0.44 apart there), or fails outright (1024 x 1040: a mask narrower than the layer).

The converter (`convert_release_checkpoint`, CLI `sample.convert_release`) is the only
part that needs torch (the `.pth` is a pickle); the converted safetensors file loads
torch-free (`load_release_adapter`).
"""
import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np

from realcustom_jax import adapter as adapter_lib
from realcustom_jax import model as model_lib
from realcustom_jax.release import encoder as release_encoder
from realcustom_jax.release import model as release_model
from realcustom_jax.release import projector as release_projector
from realcustom_jax import unet as unet_lib
from realcustom_jax.loading import weights

Params = dict[str, Any]

# The release code this module follows.
RELEASE_CODE = 'github.com/bytedance/RealCustom@28a718e70ff0cac6a35cd3285b663a63e2510227'
# The UNet keys of configs/realcustom_sigdino_highres.json: SDXL base 1.0's UNet.
RELEASE_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, act_fn='silu',
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    block_out_channels=(320, 640, 1280), layers_per_block=2, attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type='text_time',
    addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, flip_sin_to_cos=True, freq_shift=0,
    norm_eps=1e-05, norm_num_groups=32, upcast_attention=False)
# Our visual K/V name -> the release's.
VISION_KV = {'to_k_visual': 'to_k_vision', 'to_v_visual': 'to_v_vision'}
# Top-level modules of the UNet's state dict: keys under them that are not the adapter's
# are base (SDXL) weights.
_UNET_MODULES = ('conv_in', 'time_proj', 'time_embedding', 'add_time_proj', 'add_embedding',
                 'down_blocks', 'mid_block', 'up_blocks', 'conv_norm_out', 'conv_out')
_PROJECTOR_CLASS = 'ProjectorHighResMinAttn'


@dataclasses.dataclass(frozen=True)
class Attn2Layer:
  """One cross-attention layer: its release state-dict prefix and our tree path.

  Attributes:
    torch_prefix: e.g. 'down_blocks.1.attentions.0.transformer_blocks.1.attn2'.
    path: e.g. ('unet', 'down_blocks_1', 'attentions_0', 'transformer_blocks_1',
      'attn2').
    width: the layer's inner width (its block's channels), the K/V output width.
  """
  torch_prefix: str
  path: tuple[str, ...]
  width: int


def attn2_layers(unet: unet_lib.RealCustomUNet) -> list[Attn2Layer]:
  """Every attn2 of the UNet, in the release's `cross_attention_id` order.

  The release numbers its transformer blocks as it builds them: down blocks, the mid
  block, then the up blocks (70 for SDXL).
  """
  channels = tuple(unet.block_out_channels)
  depth = unet._per_block(unet.transformer_layers_per_block)  # pylint: disable=protected-access
  n = len(channels)
  groups = []  # (torch block, flax block, attentions, depth, width)
  for i, kind in enumerate(unet.down_block_types):
    if kind.startswith('CrossAttn'):
      groups.append((f'down_blocks.{i}', f'down_blocks_{i}', unet.layers_per_block,
                     depth[i], channels[i]))
  groups.append(('mid_block', 'mid_block', 1, depth[-1], channels[-1]))
  for i, kind in enumerate(unet.up_block_types):
    if kind.startswith('CrossAttn'):
      groups.append((f'up_blocks.{i}', f'up_blocks_{i}', unet.layers_per_block + 1,
                     depth[n - 1 - i], channels[n - 1 - i]))
  layers = []
  for torch_block, block, attentions, blocks, width in groups:
    for j in range(attentions):
      for k in range(blocks):
        layers.append(Attn2Layer(
            f'{torch_block}.attentions.{j}.transformer_blocks.{k}.attn2',
            ('unet', block, f'attentions_{j}', f'transformer_blocks_{k}', 'attn2'), width))
  return layers


# ---------------------------------------------------------------------------------
# Reading the release's files
# ---------------------------------------------------------------------------------


def read_unet_config(path: Optional[str]) -> tuple[dict[str, Any], Optional[int]]:
  """(UNet config, projector head width or None) from a config file.

  Args:
    path: a diffusers `unet/config.json`, or the release's model config
      (`configs/realcustom_sigdino_highres.json`: the UNet keys plus
      `image_prompt_settings`, whose projector settings are checked and give the head
      width); None: the release's SDXL config (`RELEASE_UNET_CONFIG`).

  Raises:
    weights.CheckpointError: unreadable file, a UNet our model does not build, or
      image_prompt_settings other than the release's kind.
  """
  if path is None:
    return dict(RELEASE_UNET_CONFIG), None
  try:
    with open(path) as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise weights.CheckpointError(f'UNet config {path} does not exist') from None
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise weights.CheckpointError(f'cannot read {path} as JSON: {e}') from None
  if not isinstance(raw, dict):
    raise weights.CheckpointError(f'{path} does not hold a JSON object')
  settings = raw.get('image_prompt_settings')
  unet_config = {k: _tuples(v) for k, v in raw.items()
                 if not k.startswith('_') and not isinstance(v, dict)}
  try:
    unet_lib.check_config(unet_config)
  except ValueError as e:
    raise weights.CheckpointError(f'{path}: {e}') from None
  dim_head = None
  if settings is not None:
    mode = settings.get('image_prompt_mode')
    projection = settings.get('vision_projection_config', {})
    params = projection.get('params', {})
    if mode != 'naive' or not str(projection.get('target', '')).endswith(_PROJECTOR_CLASS):
      raise weights.CheckpointError(
          f"{path}: image_prompt_mode {mode!r} with {projection.get('target')!r}; only the "
          f"release's 'naive' visual K/V with {_PROJECTOR_CLASS} is implemented")
    if params.get('adaptive_scale') or settings.get('use_cross_attention_id'):
      raise weights.CheckpointError(
          f'{path}: adaptive_scale / use_cross_attention_id are not implemented (the '
          'release sets neither)')
    dim_head = int(params.get('dim_head', release_projector.RELEASE_DIM_HEAD))
  return unet_config, dim_head


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def check_checkpoint_path(path: str, allow_pickle: bool) -> None:
  """The checks before reading a `.pth` (see `read_release_checkpoint`)."""
  path = os.fspath(path)
  if not allow_pickle:
    raise weights.CheckpointError(
        f'{path} is a torch pickle: unpickling can run code, and reading it needs torch; '
        'pass --allow_pickle if you trust the file')
  if not os.path.isfile(path):
    raise weights.CheckpointError(f'checkpoint {path} does not exist')


def read_release_checkpoint(path: str, allow_pickle: bool
                            ) -> tuple[dict[str, np.ndarray], str]:
  """(the release's `.pth` state dict as NumPy arrays, its torch dtypes).

  bfloat16 tensors (NumPy has no such type) are read as float32, exactly.

  Raises:
    weights.CheckpointError: without `allow_pickle` (a `.pth` is a pickle: loading it
      can run code), without torch, for a missing or unreadable file, or for anything
      but a flat name -> tensor mapping.
  """
  check_checkpoint_path(path, allow_pickle)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise weights.CheckpointError(
        f'reading {path} needs torch (a .pth is a torch pickle): pip install torch') from None
  try:
    # weights_only: tensors and plain containers only, no arbitrary objects.
    state = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pickle, zip and torch errors of many types
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise weights.CheckpointError(f'cannot read {path} as a torch state dict: {first}') from None
  if not isinstance(state, Mapping) or not all(
      isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
    raise weights.CheckpointError(
        f'{path} is not a flat state dict (name -> tensor), as the release saves '
        'RealCustom_highres.pth')
  dtypes = ','.join(sorted({str(v.dtype).replace('torch.', '') for v in state.values()}))
  return ({k: (v.float() if v.dtype == torch.bfloat16 else v).numpy()
           for k, v in state.items()}, dtypes)


# ---------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def adapter_from_release_state(state: Mapping[str, np.ndarray],
                               unet: unet_lib.RealCustomUNet,
                               dim_head: int = release_projector.RELEASE_DIM_HEAD,
                               where: str = 'checkpoint', skip_base_weights: bool = False
                               ) -> tuple[Params, dict[str, Any]]:
  """Maps the release's adapter tensors onto our tree for this UNet.

  Args:
    state: the release's state dict (NumPy), adapter keys and optionally base keys.
    unet: the UNet the adapter is for (SDXL for the release).
    dim_head: the projector's MinAttention head width (not in the tensors' shapes).
    where: the file, for messages.
    skip_base_weights: leave out base UNet tensors found beside the adapter instead of
      refusing the file (the converted adapter never holds base weights).

  Returns:
    (adapter tree {'unet': <visual K/V>, 'subject_projector': ...} as NumPy arrays,
    info: the widths and counts the tensors imply).

  Raises:
    weights.CheckpointError: a missing visual K/V or projector tensor, one of a shape
      this UNet's layer does not take, unexpected tensors, or base weights without
      `skip_base_weights`; every message is one line.
  """
  state = dict(state)
  layers = attn2_layers(unet)
  cross = unet.cross_attention_dim
  tree: Params = {}
  missing = []
  for layer in layers:
    for ours, theirs in VISION_KV.items():
      key = f'{layer.torch_prefix}.{theirs}.weight'
      if key not in state:
        missing.append(key)
        continue
      value = state.pop(key)
      if value.shape != (layer.width, cross):
        raise weights.CheckpointError(
            f'{where}: {key} has shape {tuple(value.shape)}, this UNet\'s layer needs '
            f'({layer.width}, {cross}): a checkpoint for another UNet (--unet_config)')
      _set(tree, layer.path + (ours, 'kernel'), np.ascontiguousarray(value.T))
  if missing:
    raise weights.CheckpointError(
        f'{where} lacks {missing[0]} and {len(missing) - 1} more of the {2 * len(layers)} '
        f'visual K/V tensors this UNet has ({len(layers)} attn2 layers): not the '
        'release\'s adapter, or one for another UNet (--unet_config)')
  prefix = release_encoder.RELEASE_PROJECTOR_PREFIX
  projector_state = {k: state.pop(k) for k in list(state) if k.startswith(prefix)}
  norm = projector_state.get(prefix + 'min_attention.norm1.weight')
  if norm is not None and norm.shape[0] % dim_head:
    raise weights.CheckpointError(
        f'{where}: the projector\'s {norm.shape[0]}-wide features are not a multiple of '
        f'dim_head {dim_head}: give the release\'s config (--unet_config) or --dim_head')
  # Kept in the file's dtype (the K/V stay in theirs too): float16 halves the 400M
  # release adapter parameters.
  dtype = np.result_type(*projector_state.values()) if projector_state else np.float32
  projector, projector_params = release_encoder.projector_from_torch_state(
      projector_state, dim_head, prefix, where, dtype=dtype)
  if projector.out_dim != cross:
    raise weights.CheckpointError(
        f'{where}: the projector gives {projector.out_dim}-wide tokens, this UNet\'s '
        f'cross-attention takes {cross} (--unet_config)')
  tree['subject_projector'] = jax.tree_util.tree_map(np.asarray, projector_params)
  vision_left = sorted(k for k in state if k.endswith(tuple(
      f'.{name}.weight' for name in VISION_KV.values())))
  if vision_left:
    raise weights.CheckpointError(
        f'{where} has visual K/V tensors this UNet lacks ({vision_left[0]} and '
        f'{len(vision_left) - 1} more): a checkpoint for another UNet (--unet_config)')
  base = sorted(k for k in state if k.split('.')[0] in _UNET_MODULES)
  other = sorted(set(state) - set(base))
  if other:
    raise weights.CheckpointError(
        f'{where} has {len(other)} unexpected tensor(s) ({", ".join(other[:3])}): not '
        'the release\'s RealCustom checkpoint')
  if base and not skip_base_weights:
    raise weights.CheckpointError(
        f'{where} also holds {len(base)} base UNet tensor(s) (e.g. {base[0]}); the '
        'converted adapter leaves them out and the model takes the base from the SDXL '
        'directory: pass --skip_base_weights if they are the SDXL base\'s')
  info = dict(vision_dim=projector.vision_dim, out_dim=projector.out_dim,
              dim_head=projector.dim_head, cross_attention_layers=len(layers),
              skipped_base_tensors=len(base))
  return tree, info


def release_metadata(info: Mapping[str, Any], unet_config: Mapping[str, Any],
                     source: str, source_dtype: str) -> dict[str, str]:
  """The safetensors metadata of a converted release adapter.

  'adapter_kind' / 'adapter_layout' keep it out of paper models (and paper adapters out
  of the release model); 'model_config' is the `config.model` it needs;
  'release_config' records the release settings the tensors imply.
  """
  unet_keys = ('down_block_types', 'up_block_types', 'block_out_channels',
               'layers_per_block', 'transformer_layers_per_block', 'attention_head_dim',
               'cross_attention_dim')
  release_config = dict(
      image_prompt_mode='naive', vision_projection=_PROJECTOR_CLASS, adaptive_scale=False,
      vision_dim=info['vision_dim'], out_dim=info['out_dim'], dim_head=info['dim_head'],
      cross_attention_layers=info['cross_attention_layers'],
      unet={k: unet_config[k] for k in unet_keys if k in unet_config})
  model_config = dict(projector=release_model.PROJECTOR, scoring='none',
                      release_vision_dim=info['vision_dim'],
                      release_dim_head=info['dim_head'])
  return {'adapter_kind': adapter_lib.RELEASE_KIND,
          'adapter_layout': adapter_lib.RELEASE_LAYOUT,
          'model_config': json.dumps(model_config, sort_keys=True),
          'release_config': json.dumps(release_config, sort_keys=True),
          'source': os.path.basename(source), 'source_dtype': source_dtype,
          'release_code': RELEASE_CODE}


def convert_release_checkpoint(checkpoint: str, out: str, *, allow_pickle: bool,
                               unet_config: Optional[str] = None,
                               dim_head: Optional[int] = None,
                               skip_base_weights: bool = False) -> dict[str, Any]:
  """Converts the release's `.pth` into our safetensors adapter file.

  Args:
    checkpoint: the release's RealCustom_highres.pth (a torch pickle).
    out: destination `.safetensors` file.
    allow_pickle: must be True (see `read_release_checkpoint`).
    unet_config: see `read_unet_config` (None: the release's SDXL).
    dim_head: the projector's head width; None: the release config's, else 64.
    skip_base_weights: see `adapter_from_release_state`.

  Returns:
    The conversion info (widths, layer count, source dtype).

  Raises:
    weights.CheckpointError (a ValueError): every user mistake, one line.
  """
  check_checkpoint_path(checkpoint, allow_pickle)
  if not os.fspath(out).endswith('.safetensors'):
    raise weights.CheckpointError(f'output {out} must end in .safetensors')
  config, config_dim_head = read_unet_config(unet_config)
  if dim_head is not None and config_dim_head is not None and dim_head != config_dim_head:
    raise weights.CheckpointError(
        f'dim_head {dim_head} contradicts {unet_config} (dim_head {config_dim_head})')
  dim_head = dim_head or config_dim_head or release_projector.RELEASE_DIM_HEAD
  unet = unet_lib.RealCustomUNet.from_config(config)
  state, source_dtype = read_release_checkpoint(checkpoint, allow_pickle)
  tree, info = adapter_from_release_state(state, unet, dim_head, checkpoint,
                                          skip_base_weights)
  adapter_lib.save_adapter(out, tree, release_metadata(info, config, checkpoint, source_dtype))
  return dict(info, source_dtype=source_dtype)


# ---------------------------------------------------------------------------------
# Back to the release's layout (export of an adapter trained here)
# ---------------------------------------------------------------------------------


def projector_to_torch_state(params: Mapping) -> dict[str, np.ndarray]:
  """The projector tree under the release's state-dict names (`.weight` (out, in))."""
  state = {}
  for key, value in jax.tree_util.tree_leaves_with_path(params):
    names = tuple(k.key for k in key)
    value = np.asarray(value)
    torch_key = release_encoder._projector_torch_key  # pylint: disable=protected-access
    state[release_encoder.RELEASE_PROJECTOR_PREFIX + torch_key(names)] = (
        np.ascontiguousarray(value.T if names[-1] == 'kernel' else value))
  return state


def export_release_state(adapter: Mapping, unet: unet_lib.RealCustomUNet
                         ) -> dict[str, np.ndarray]:
  """Our adapter tree under the release's state-dict keys (`RealCustom_highres.pth`):
  every attn2's `to_k_vision.weight` / `to_v_vision.weight` and the projector, torch's
  (out, in) layout; the inverse of `convert.adapter_from_release_state`.

  Raises:
    ValueError: a visual K/V the UNet has is missing from `adapter`.
  """
  state = {}
  for layer in attn2_layers(unet):
    node = adapter
    try:
      for key in layer.path:
        node = node[key]
    except KeyError:
      raise ValueError(f'the adapter has no visual K/V at {"/".join(layer.path)}') from None
    for ours, theirs in VISION_KV.items():
      state[f'{layer.torch_prefix}.{theirs}.weight'] = np.ascontiguousarray(
          np.asarray(node[ours]['kernel']).T)
  state.update(projector_to_torch_state(adapter['subject_projector']))
  return state


# ---------------------------------------------------------------------------------
# Loading (torch-free)
# ---------------------------------------------------------------------------------


def model_config_of(metadata: Mapping[str, str]) -> dict[str, Any]:
  """The `config.model` keys a converted adapter needs (from its metadata)."""
  return json.loads(metadata['model_config'])


def build_release_model(unet_config: Mapping[str, Any], metadata: Mapping[str, str],
                        **unet_overrides) -> release_model.ReleaseRealCustom:
  """The release model over a diffusers UNet config, sized by a converted adapter.

  Args:
    unet_config: the SDXL UNet's config (e.g. `sdxl_loading.load_sdxl(...).unet_config`).
    metadata: the converted adapter's metadata (`adapter_lib.load_adapter_metadata`).
    **unet_overrides: RealCustomUNet fields (dtype, attention_impl, remat, ...).
  """
  m = model_config_of(metadata)
  unet = unet_lib.RealCustomUNet.from_config(unet_config, **unet_overrides)
  return release_model.ReleaseRealCustom(unet=unet,
                                         release_vision_dim=int(m['release_vision_dim']),
                                         release_dim_head=int(m['release_dim_head']))


def load_release_adapter(path: str, model: Optional[model_lib.RealCustom] = None
                         ) -> tuple[Params, dict[str, str]]:
  """Reads a converted release adapter, torch-free.

  Args:
    path: the `.safetensors` file `convert_release_checkpoint` wrote.
    model: when given, the tree must fit it (every leaf present, same shapes).

  Returns:
    (adapter tree of NumPy arrays, the file's metadata).

  Raises:
    ValueError: a paper adapter or other file, or a tree that does not fit `model`
      (one line).
  """
  path = os.fspath(path)
  params, metadata = adapter_lib.read_adapter(path, adapter_lib.RELEASE_KIND)
  if model is not None:
    if not isinstance(model, release_model.ReleaseRealCustom):
      raise ValueError(f'adapter file {path} is the release\'s; the model is '
                       f'{type(model).__name__}')
    expected = model_lib.param_shapes(model, (4, 8, 8), 1, 1, 1)
    adapter_lib.check_tree_fits(params, adapter_lib.split_params(expected)[1],
                                f'adapter file {path}')
  return params, metadata
