"""Text and visual cross-attention of the extended UNet (Eqs. 3, 4, 12).

Parameter names follow diffusers' `FlaxAttention` (`to_q`, `to_k`, `to_v`, `to_out_0`) so
that Stable Diffusion checkpoints load unchanged; the visual branch adds the bias-free
`to_k_visual` / `to_v_visual` projections of Eq. 4.
"""
import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from realcustom_jax.sharding import BATCH_AXES

Array = jax.Array

# The collection every self-attention layer sows its (B, heads, N, N) probabilities into,
# only when the caller makes it mutable (the release's self-map mask refinement): other
# calls neither store nor, with cuDNN attention, compute them.
SELF_ATTENTION_MAPS = 'self_attention_maps'


def _split_heads(x: Array, heads: int) -> Array:
  """(B, N, H*D) -> (B, H, N, D)."""
  b, n, hd = x.shape
  return x.reshape(b, n, heads, hd // heads).transpose(0, 2, 1, 3)


def _merge_heads(x: Array) -> Array:
  """(B, H, N, D) -> (B, N, H*D)."""
  b, h, n, d = x.shape
  return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


# config.model.attention_impl: 'xla' (einsum, the probabilities materialised), 'cudnn'
# (cuDNN flash attention through `jax.nn.dot_product_attention`, NVIDIA GPUs), 'pallas'
# (JAX's Pallas TPU flash-attention kernel) or 'auto' (chosen per layer, `layer_attention_impl`).
ATTENTION_IMPLS = ('xla', 'cudnn', 'pallas', 'auto')

# cuDNN's sequence lengths are padded to a multiple of this (see `fused_attention`).
CUDNN_MULTIPLE = 8

# Word maps out of the fused text kernel (`fused_attention_with_word_maps`). False: the
# maps' rows' probabilities through XLA beside the fused output, as before; read at trace
# time, for benchmarks.sampling's before/after comparison (--nofused_word_maps) only.
FUSED_WORD_MAPS = True

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
  function being jitted (as `training.TrainSetup`'s steps do) or around its first call."""
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
      at all gives zeros (as `visual_cross_attention` does).
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
      `word_attention_map`).
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


def attention_probs(q: Array, k: Array, key_mask: Optional[Array] = None) -> Array:
  """Softmax(Q K^T / sqrt(d)) of Eq. 3, in float32, optionally masking keys.

  Args:
    q: (B, H, Nq, D) queries.
    k: (B, H, Nk, D) keys.
    key_mask: optional (B, Nk) bool; False keys get no attention.

  Returns:
    (B, H, Nq, Nk) float32 attention probabilities.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
  logits = logits * scale
  if key_mask is not None:
    # A finite floor (not -inf) keeps an all-masked row a uniform softmax instead of
    # NaN; callers zero such rows (see `visual_cross_attention`).
    logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def text_cross_attention(q: Array, k: Array, v: Array) -> tuple[Array, Array]:
  """Eq. 3: Softmax(Q K^T / sqrt(d)) V over the text tokens.

  Returns:
    The (B, H, Nq, D) output and the (B, H, Nq, Nk) probabilities (the word maps of
    Eq. 11 are read off them).
  """
  probs = attention_probs(q, k)
  out = jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v.dtype), v)
  return out, probs


def visual_cross_attention(q: Array, k_visual: Array, v_visual: Array,
                           token_mask: Optional[Array] = None, impl: str = 'xla') -> Array:
  """Eq. 4, second term: Softmax(Q K_i^T / sqrt(d)) V_i over the selected image tokens.

  The top-k selection of Eq. 10 keeps all n_i tokens (static shapes under jit) and
  removes the unselected ones from the softmax through `token_mask` (a fused kernel gets
  them as a key length, see `fused_attention`). A row with no selected token
  (gamma_num * n_i < 1, or image dropout in training) contributes zero.

  Args:
    q: (B, H, Nq, D) the same queries as the text attention.
    k_visual: (B, H, Ni, D) visual keys W_Ki f_ci.
    v_visual: (B, H, Ni, D) visual values W_Vi f_ci.
    token_mask: optional (B, Ni) bool, True for selected tokens.
    impl: 'xla' (einsum) or a fused kernel ('cudnn', 'pallas').

  Returns:
    (B, H, Nq, D) visual attention output.
  """
  if impl != 'xla':
    heads_second = lambda x: x.transpose(0, 2, 1, 3)
    return heads_second(fused_attention(heads_second(q), heads_second(k_visual),
                                        heads_second(v_visual), impl, token_mask))
  probs = attention_probs(q, k_visual, token_mask)
  if token_mask is not None:
    any_selected = jnp.any(token_mask, axis=-1)
    probs = probs * any_selected[:, None, None, None]
  return jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v_visual.dtype), v_visual)


def resize_scope(scope: Array, height: int, width: int, antialias: bool = False) -> Array:
  """Bilinear resize of a (B, H0, W0) influence scope to one layer's (h, w).

  Torch's bilinear interpolation (the authors') does not antialias; `jax.image.resize`
  does when it downsamples unless told not to, hence the explicit flag.
  """
  b = scope.shape[0]
  if scope.shape[1:] == (height, width):
    return scope
  return jax.image.resize(scope, (b, height, width), method='bilinear', antialias=antialias)


def gate_by_scope(visual_out: Array, scope: Array, height: int, width: int,
                  antialias: bool = False) -> Array:
  """Eq. 12: multiply the visual attention output by the scope resized to (h, w).

  Args:
    visual_out: (B, h*w, C) visual attention output (heads merged).
    scope: (B, H0, W0) influence scope M-hat of Eq. 11.
    height: the layer's spatial height h.
    width: the layer's spatial width w.
    antialias: antialias when downsampling the scope (torch does not).

  Returns:
    (B, h*w, C) gated output.
  """
  m = resize_scope(scope.astype(jnp.float32), height, width, antialias)
  return visual_out * m.reshape(m.shape[0], height * width, 1).astype(visual_out.dtype)


def word_attention_map(probs: Array, word_weights: Array, height: int, width: int) -> Array:
  """The target word's map in one layer: mean over heads, summed over its token indices.

  Args:
    probs: (B, H, h*w, Nt) text attention probabilities (softmax over all Nt tokens) of
      the rows that have word weights.
    word_weights: (B, Nt), 1 at each token index of the word (every BPE piece of every
      occurrence), 0 elsewhere; or (B, R, Nt), one word per reference subject.
    height: h.
    width: w.

  Returns:
    (B, h, w) float32 map, or (B, R, h, w) with per-reference weights.
  """
  per_token = probs.mean(axis=1)
  if word_weights.ndim == 3:
    m = jnp.einsum('bqk,brk->brq', per_token, word_weights.astype(per_token.dtype))
    return m.reshape(m.shape[:2] + (height, width))
  m = jnp.einsum('bqk,bk->bq', per_token, word_weights.astype(per_token.dtype))
  return m.reshape(m.shape[0], height, width)


def multi_reference_visual_attention(q: Array, k_visual: Array, v_visual: Array,
                                     token_mask: Optional[Array], scope: Optional[Array],
                                     height: int, width: int, antialias: bool = False,
                                     impl: str = 'xla') -> Array:
  """Several reference subjects: each attends alone, is gated by its own scope, summed.

  What the release's processor does with `multiple_reference_image` (one softmax per
  reference, not one over all references' tokens).

  Args:
    q: (B, H, Nq, D) queries.
    k_visual: (B, R, H, Ni, D) visual keys of the R references.
    v_visual: (B, R, H, Ni, D) visual values.
    token_mask: optional (B, R, Ni) bool, the selected tokens of each reference.
    scope: optional (B, R, H0, W0) per-reference influence scopes.
    height: the layer's h.
    width: the layer's w.
    antialias: see `resize_scope`.
    impl: see `visual_cross_attention`.

  Returns:
    (B, Nq, H*D) the summed, gated visual output (heads merged).
  """
  total = 0.0
  for r in range(k_visual.shape[1]):
    out = _merge_heads(visual_cross_attention(
        q, k_visual[:, r], v_visual[:, r], None if token_mask is None else token_mask[:, r],
        impl))
    if scope is not None:
      out = gate_by_scope(out, scope[:, r], height, width, antialias)
    total = total + out
  return total


class Attention(nn.Module):
  """Self-attention (attn1) or the extended text + visual cross-attention (attn2).

  Attributes:
    query_dim: width of the image features f_i.
    heads: number of heads.
    dim_head: width per head.
    is_cross: attn2 (keys from the text, and the optional visual branch).
    attention_impl: one of ATTENTION_IMPLS, resolved per layer by `layer_attention_impl`.
      A fused kernel never forms the probability tensor: the word maps of Eq. 11 come
      out of the text kernel itself (`fused_attention_with_word_maps`), and the
      release's self-attention maps, where asked for, are computed beside it.
    mask_antialias: see `resize_scope`.
    dtype: compute dtype.
  """
  query_dim: int
  heads: int
  dim_head: int
  is_cross: bool = False
  attention_impl: str = 'xla'
  mask_antialias: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, hidden_states: Array, context: Optional[Array] = None, *,
               spatial: tuple[int, int] = (0, 0),
               visual_tokens: Optional[Array] = None,
               visual_token_mask: Optional[Array] = None,
               scope_mask: Optional[Array] = None,
               word_weights: Optional[Array] = None) -> Array:
    """One attention layer.

    `visual_tokens` (B, Ni, c) is one subject; (B, R, Ni, c) is R reference subjects,
    with `visual_token_mask` (B, R, Ni) and `scope_mask` (B, R, H0, W0) per reference
    (see `multi_reference_visual_attention`). `word_weights` (B_w, Nt) sows one word map,
    (B_w, R, Nt) one per reference, for the LAST B_w <= B rows (the sampler's
    [uncond, T2I] call passes weights for its T2I half, and the uncond half's maps are
    never computed).
    """
    inner = self.heads * self.dim_head
    dense = lambda name, bias=False: nn.Dense(inner, use_bias=bias, dtype=self.dtype, name=name)
    is_self = context is None  # attn1 of an only_cross_attention block is not
    context = hidden_states if context is None else context
    q = dense('to_q')(hidden_states)
    k = dense('to_k')(context)
    v = dense('to_v')(context)
    impl = layer_attention_impl(self.attention_impl, self.dim_head, q.shape[1], self.dtype)

    if not self.is_cross:
      return self._out(self._self_attention(q, k, v, impl, sow=is_self))
    qh = _split_heads(q, self.heads)
    out = self._text_attention(q, qh, k, v, impl, spatial, word_weights)
    if visual_tokens is not None and visual_tokens.ndim == 4:
      split = lambda x: jax.vmap(_split_heads, (1, None), 1)(x, self.heads)
      out = out + multi_reference_visual_attention(
          qh, split(dense('to_k_visual')(visual_tokens)),
          split(dense('to_v_visual')(visual_tokens)), visual_token_mask, scope_mask,
          *spatial, antialias=self.mask_antialias, impl=impl)
    elif visual_tokens is not None:
      k_vis = dense('to_k_visual')(visual_tokens)
      v_vis = dense('to_v_visual')(visual_tokens)
      vis = _merge_heads(visual_cross_attention(
          qh, _split_heads(k_vis, self.heads), _split_heads(v_vis, self.heads),
          visual_token_mask, impl))
      if scope_mask is not None:
        vis = gate_by_scope(vis, scope_mask, *spatial, antialias=self.mask_antialias)
      out = out + vis
    return self._out(out)

  def _out(self, x: Array) -> Array:
    return nn.Dense(self.query_dim, dtype=self.dtype, name='to_out_0')(x)

  def _heads_last(self, x: Array) -> Array:
    """(B, N, H*D) -> (B, N, H, D), the fused kernels' layout (a free reshape)."""
    return x.reshape(x.shape[:2] + (self.heads, self.dim_head))

  def _text_attention(self, q: Array, qh: Array, k: Array, v: Array, impl: str,
                      spatial: tuple[int, int], word_weights: Optional[Array]) -> Array:
    """Eq. 3, and the word maps of the rows that have word weights (sown)."""
    if impl == 'xla':
      out, probs = text_cross_attention(qh, _split_heads(k, self.heads),
                                        _split_heads(v, self.heads))
      if word_weights is not None:
        self.sow('intermediates', 'word_map', word_attention_map(
            probs[-word_weights.shape[0]:], word_weights, *spatial))
      return _merge_heads(out)
    q, k, v = (self._heads_last(x) for x in (q, k, v))
    if word_weights is None:
      out = fused_attention(q, k, v, impl)
      return out.reshape(out.shape[:2] + (-1,))
    rows = word_weights.shape[0]
    refs = word_weights.shape[1] if word_weights.ndim == 3 else 1
    widened = word_map_head_width(self.dim_head, refs)
    if not FUSED_WORD_MAPS or impl == 'cudnn' and widened > max(128, cudnn_widest_head()):
      # No room for the word columns in this GPU's cuDNN head (every one takes 128):
      # the maps' rows alone through XLA, beside the fused output.
      probs = attention_probs(qh[-rows:], k[-rows:].transpose(0, 2, 1, 3))
      out = fused_attention(q, k, v, impl)
      maps = word_attention_map(probs, word_weights, *spatial)
    else:
      out, maps = fused_attention_with_word_maps(q, k, v, word_weights, impl)
      maps = maps.reshape(maps.shape[:-1] + tuple(spatial))
    self.sow('intermediates', 'word_map', maps)
    return out.reshape(out.shape[:2] + (-1,))

  def _self_attention(self, q: Array, k: Array, v: Array, impl: str,
                      sow: bool = False) -> Array:
    sow = sow and self.is_mutable_collection(SELF_ATTENTION_MAPS)
    if impl == 'xla' or sow:
      qh, kh, vh = (_split_heads(x, self.heads) for x in (q, k, v))
      probs = attention_probs(qh, kh)
      if sow:
        self.sow(SELF_ATTENTION_MAPS, 'self_map', probs)
    if impl == 'xla':
      return _merge_heads(jnp.einsum('bhqk,bhkd->bhqd', probs.astype(vh.dtype), vh))
    out = fused_attention(*(self._heads_last(x) for x in (q, k, v)), impl)
    return out.reshape(q.shape)
