"""Fused (flash) attention kernels and the rules for using them.

`fused_attention` is Softmax(Q K^T) V without the probability tensor: cuDNN's kernel
through `jax.nn.dot_product_attention` on NVIDIA GPUs, JAX's Pallas TPU kernel, or the
same call's XLA kernel; `layer_attention_impl` picks one per layer (`attention_impl`
'auto'), `fused_attention_with_word_maps` gets Eq. 11's word maps out of the same call,
and `per_batch_shard` / `batch_mesh` run a Pallas kernel per device on a pod. The
attention layers that call them are in `realcustom_jax.attention`.
"""
import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from realcustom_jax.runtime.sharding import BATCH_AXES

Array = jax.Array

# config.model.attention_impl: 'xla' (einsum, the probabilities materialised), 'cudnn'
# (cuDNN flash attention through `jax.nn.dot_product_attention`, NVIDIA GPUs), 'pallas'
# (JAX's Pallas TPU flash-attention kernel) or 'auto' (chosen per layer, `layer_attention_impl`).
ATTENTION_IMPLS = ('xla', 'cudnn', 'pallas', 'auto')

# cuDNN's sequence lengths are padded to a multiple of this (see `fused_attention`).
CUDNN_MULTIPLE = 8

# The Pallas TPU kernel's tile: sequence lengths (and head widths above it) are padded to
# a multiple of this.
PALLAS_BLOCK = 128


def layer_attention_impl(requested: str, head_dim: int, q_len: int = 0,
                         dtype=jnp.bfloat16, device: Optional[jax.Device] = None) -> str:
  """The attention kernel one layer uses: 'xla', 'cudnn' or 'pallas'.

  'auto' picks a fused (flash) kernel per layer where it is available and pays off:
  - NVIDIA GPU: cuDNN for half-precision inputs (cuDNN takes no float32) and a head width
    that is a multiple of 8 and at most 128 (256 from Hopper, compute capability 9.0).
    SD 1.5's widths are 40 / 80 / 160, so on an A100 its 1280-channel layers stay on
    XLA. (`jax.nn.dot_product_attention` left to choose, as of JAX 0.10, always takes
    XLA.)
  - TPU: the Pallas flash kernel where the query length is a multiple of its 128-row tile
    (SD's 64x64, 32x32 and 16x16 levels); shorter maps (8x8) stay on XLA, whose score
    tensor is small there.
  Anything else (CPU, older GPUs) takes XLA. 'xla', 'cudnn' and 'pallas' are taken as
  asked.
  """
  if requested not in ATTENTION_IMPLS:
    raise ValueError(f'attention_impl must be one of {ATTENTION_IMPLS}, got {requested!r}')
  if requested != 'auto':
    return requested
  device = device or jax.devices()[0]
  if device.platform == 'tpu':
    return 'pallas' if q_len and q_len % PALLAS_BLOCK == 0 else 'xla'
  if device.platform != 'gpu' or 'nvidia' not in device.device_kind.lower():
    return 'xla'
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return 'xla'
  widest = cudnn_widest_head(device)
  return 'cudnn' if head_dim % 8 == 0 and 0 < widest and head_dim <= widest else 'xla'


def cudnn_widest_head(device: Optional[jax.Device] = None) -> int:
  """The widest head cuDNN's flash attention takes on this device: 256 from Hopper
  (compute capability 9.0), 128 on Ampere, 0 where it has none."""
  device = device or jax.devices()[0]
  try:
    major = int(str(getattr(device, 'compute_capability', '0')).split('.')[0])
  except ValueError:
    major = 0
  return 256 if major >= 9 else 128 if major >= 8 else 0


def _selected_first(k: Array, v: Array, key_mask: Array) -> tuple[Array, Array, Array]:
  """Moves each row's selected keys (and their values) to the front: (k, v, lengths).

  Softmax attention does not depend on the order of its keys, so Eq. 10's top-k mask
  becomes a key length, which the fused kernels take with static shapes.
  """
  order = jnp.argsort(~key_mask, axis=-1, stable=True)
  take = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
  return take(k), take(v), jnp.sum(key_mask, axis=-1).astype(jnp.int32)


def _pad_axis(x: Array, axis: int, multiple: int) -> Array:
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, extra)
  return jnp.pad(x, pad)


def _pallas_attention(q: Array, k: Array, v: Array, key_mask: Optional[Array],
                      scale: float) -> Array:
  """JAX's Pallas TPU flash attention on (B, T, N, D) inputs, any T, S and D.

  The kernel works in 128-row tiles, and takes head widths above 128 only as multiples
  of 128: sequences are zero-padded to whole tiles, padded and unselected keys are kept
  out through segment ids, widths are zero-padded (zeros add nothing to Q K^T, and the
  padded output columns are dropped). The scale is the caller's.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # pylint: disable=g-import-not-at-top
  b, t, _, d = q.shape
  s = k.shape[1]
  keep = jnp.ones((b, s), bool) if key_mask is None else key_mask
  width = d if d <= PALLAS_BLOCK else d + (-d % PALLAS_BLOCK)
  to_bhtd = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, width - d),)).transpose(0, 2, 1, 3)
  q, k, v = (_pad_axis(to_bhtd(x), 2, PALLAS_BLOCK) for x in (q, k, v))
  segments = pallas_flash.SegmentIds(
      q=jnp.ones(q.shape[:1] + q.shape[2:3], jnp.int32),
      kv=_pad_axis(keep.astype(jnp.int32), 1, PALLAS_BLOCK))
  kernel = lambda q, k, v, segments: pallas_flash.flash_attention(
      q, k, v, segment_ids=segments, sm_scale=scale)
  out = per_batch_shard(kernel, q, k, v, segments)
  return out[:, :, :t, :d].transpose(0, 2, 1, 3)


_BATCH_MESH = contextvars.ContextVar('realcustom_batch_mesh', default=None)


@contextlib.contextmanager
def batch_mesh(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Within it, functions being traced run Pallas kernels per device over `mesh`'s batch
  axes (`per_batch_shard`). Plain Python state read at trace time: enter it inside the
  function being jitted (as `adapter_training.TrainSetup`'s steps do) or around its first
  call."""
  token = _BATCH_MESH.set(mesh)
  try:
    yield
  finally:
    _BATCH_MESH.reset(token)


def current_batch_mesh():
  """The mesh `per_batch_shard` splits over: `batch_mesh`'s, else JAX's own (the abstract
  mesh of `jax.set_mesh`), else None."""
  mesh = _BATCH_MESH.get()
  if mesh is None:
    mesh = getattr(jax.sharding, 'get_abstract_mesh', lambda: None)()
    mesh = None if mesh is None or mesh.empty else mesh
  return mesh


def per_batch_shard(kernel: Callable[..., Array], *args) -> Array:
  """Runs `kernel` on each device's slice of the batch when a mesh splits the batch.

  A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split: inside a
  step whose batch is sharded over the mesh (the train step on a pod), it would gather
  every input onto one device and compute the global batch there (with 8 CPU devices
  the gather even deadlocked). Under a mesh (`current_batch_mesh`), the kernel runs in a
  `shard_map` over the mesh's batch axes present (`sharding.BATCH_AXES`) whose sizes
  divide the batch; without a mesh, or with none of them, it runs as it is.

  Args:
    kernel: a function of arrays (pytrees) whose leading axis is the batch.
    *args: its arguments.

  Returns:
    kernel(*args), batch-sharded like its inputs.
  """
  mesh = current_batch_mesh()
  batch = args[0].shape[0]
  axes, size = [], 1
  for name in BATCH_AXES if mesh is not None else ():
    n = dict(mesh.shape).get(name, 1)
    if n > 1 and batch % (size * n) == 0:
      axes.append(name)
      size *= n
  if not axes:
    return kernel(*args)
  spec = jax.sharding.PartitionSpec(tuple(axes))
  # check_vma off: the kernel's outputs vary over the batch axes like its inputs, which
  # pallas_call cannot state.
  return jax.shard_map(kernel, mesh=mesh, in_specs=spec, out_specs=spec,
                       check_vma=False)(*args)


def fused_attention(q: Array, k: Array, v: Array, impl: str,
                    key_mask: Optional[Array] = None, scale: Optional[float] = None) -> Array:
  """Softmax(Q K^T * scale) V without materialising the probabilities.

  Args:
    q: (B, T, N, D) queries (heads on axis 2, `jax.nn.dot_product_attention`'s layout).
    k: (B, S, N, D) keys.
    v: (B, S, N, D) values.
    impl: 'cudnn' or 'pallas' (see `layer_attention_impl`); 'xla' runs the same maths
      through `jax.nn.dot_product_attention`'s XLA kernel.
    key_mask: optional (B, S) bool; False keys get no attention, and a row with no key
      at all gives zeros (as `attention.visual_cross_attention` does).
    scale: the logits' scale; default 1 / sqrt(D).

  Returns:
    (B, T, N, D) attention output.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  if impl == 'pallas':
    out = _pallas_attention(q, k, v, key_mask, scale)
  else:
    t, s = q.shape[1], k.shape[1]
    keep = key_mask
    if impl == 'cudnn' and (t % CUDNN_MULTIPLE or s % CUDNN_MULTIPLE):
      # cuDNN's training kernels take even lengths only (JAX checks T % 2 and S % 2 for
      # the backward pass; the 77 CLIP text tokens fail it): padded queries are
      # dropped afterwards, padded keys are kept out through the key length.
      keep = jnp.ones(k.shape[:2], bool) if keep is None else keep
      q = _pad_axis(q, 1, CUDNN_MULTIPLE)
      k, v, keep = (_pad_axis(x, 1, CUDNN_MULTIPLE) for x in (k, v, keep))
    if keep is None:
      out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl)
    else:
      k, v, lengths = _selected_first(k, v, keep)
      out = jax.nn.dot_product_attention(
          q, k, v, key_value_seq_lengths=jnp.maximum(lengths, 1), scale=scale,
          implementation=impl)
    out = out[:, :t]
  if key_mask is not None:
    out = out * jnp.any(key_mask, axis=-1)[:, None, None, None].astype(out.dtype)
  return out


def word_map_head_width(head_dim: int, refs: int) -> int:
  """The head width `fused_attention_with_word_maps` calls its kernel with: the head
  plus one word column per reference, rounded up to a multiple of 8."""
  width = head_dim + refs
  return width + -width % CUDNN_MULTIPLE


def fused_attention_with_word_maps(q: Array, k: Array, v: Array, word_weights: Array,
                                   impl: str) -> tuple[Array, Array]:
  """Eq. 3 and the word's attention mass of Eq. 11 from ONE fused kernel call.

  A word map is sum_j w_j Softmax(Q K^T / sqrt(d))_{nj}: attention whose values are the
  word weights. Appended to V as extra columns (with zero columns appended to Q and K,
  which leave the scores unchanged), the weights come out of the same kernel beside
  Eq. 3's output, so the (rows, heads, N, Nt) probabilities are never formed. The
  widened head is rounded up to a multiple of 8 (cuDNN's granularity); the scale stays
  the true width's. The maps carry the kernel's output precision (bfloat16 when the
  model computes in it).

  Args:
    q: (B, T, N, D) queries, heads on axis 2.
    k: (B, S, N, D) text keys.
    v: (B, S, N, D) text values.
    word_weights: (B_w, S) or (B_w, R, S) weights of the LAST B_w rows (see
      `attention.word_attention_map`).
    impl: a fused kernel ('cudnn', 'pallas'), or 'xla' for JAX's kernel.

  Returns:
    The (B, T, N, D) attention output and the head-mean word maps of the last B_w rows,
    float32 (B_w, T) or (B_w, R, T).
  """
  b, _, heads, d = q.shape
  s = k.shape[1]
  rows = word_weights.shape[0]
  per_ref = word_weights.reshape(rows, -1, s)
  refs = per_ref.shape[1]
  columns = jnp.zeros((b, s, refs), v.dtype).at[b - rows:].set(
      per_ref.transpose(0, 2, 1).astype(v.dtype))
  v = jnp.concatenate([v, jnp.broadcast_to(columns[:, :, None], (b, s, heads, refs))], -1)
  width = word_map_head_width(d, refs)
  q, k, v = (jnp.pad(x, ((0, 0),) * 3 + ((0, width - x.shape[-1]),)) for x in (q, k, v))
  out = fused_attention(q, k, v, impl, scale=d ** -0.5)
  maps = out[b - rows:, :, :, d:d + refs].astype(jnp.float32).mean(axis=2)
  maps = maps.transpose(0, 2, 1)
  return out[..., :d], maps if word_weights.ndim == 3 else maps[:, 0]
