"""Text and visual cross-attention of the extended UNet (Eqs. 3, 4, 12) and word maps (Eq. 11).

Parameter names follow diffusers' `FlaxAttention` (`to_q`, `to_k`, `to_v`, `to_out_0`) so
that Stable Diffusion checkpoints load unchanged; the visual branch adds the bias-free
`to_k_visual` / `to_v_visual` projections of Eq. 4. The einsum forms here are the
reference maths; the fused (flash) kernels and their dispatch are in `kernels`.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from realcustom_jax import kernels

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

  A float `token_mask` is a training-time straight-through selection (see
  `scoring.straight_through_keep`): 1 / 0 in value, with a gradient. The softmax then
  runs over every token and is renormalised over the kept ones, p_j m_j / sum(p m),
  which equals the masked softmax where m is 0 / 1, while d/dm_j is non-zero for the
  dropped tokens too (what keeping token j would change). It takes the einsum path.

  Args:
    q: (B, H, Nq, D) the same queries as the text attention.
    k_visual: (B, H, Ni, D) visual keys W_Ki f_ci.
    v_visual: (B, H, Ni, D) visual values W_Vi f_ci.
    token_mask: optional (B, Ni) bool, True for selected tokens, or float keep weights.
    impl: 'xla' (einsum) or a fused kernel ('cudnn', 'pallas').

  Returns:
    (B, H, Nq, D) visual attention output.
  """
  if token_mask is not None and jnp.issubdtype(token_mask.dtype, jnp.floating):
    probs = attention_probs(q, k_visual)
    kept = probs * token_mask[:, None, None, :].astype(jnp.float32)
    total = jnp.sum(kept, axis=-1, keepdims=True)
    # A row that keeps nothing (image dropout) contributes zero, as with a bool mask.
    probs = kept / jnp.where(total > 0, total, 1.0)
    return jnp.einsum('bhqk,bhkd->bhqd', probs.astype(v_visual.dtype), v_visual)
  if impl != 'xla':
    heads_second = lambda x: x.transpose(0, 2, 1, 3)
    return heads_second(kernels.fused_attention(heads_second(q), heads_second(k_visual),
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
    attention_impl: one of `kernels.ATTENTION_IMPLS`, resolved per layer by
      `kernels.layer_attention_impl`.
      A fused kernel never forms the probability tensor: the word maps of Eq. 11 come
      out of the text kernel itself (`kernels.fused_attention_with_word_maps`), and the
      release's self-attention maps, where asked for, are computed beside it.
    mask_antialias: see `resize_scope`.
    dtype: compute dtype.
    fused_word_maps: with a fused kernel, the word maps out of the text kernel's
      widened heads; False: their rows' probabilities through XLA beside it (for a
      comparison of the two, `benchmarks.sampling --nofused_word_maps`).
  """
  query_dim: int
  heads: int
  dim_head: int
  is_cross: bool = False
  attention_impl: str = 'xla'
  mask_antialias: bool = False
  dtype: jnp.dtype = jnp.float32
  fused_word_maps: bool = True

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
    impl = kernels.layer_attention_impl(self.attention_impl, self.dim_head, q.shape[1],
                                        self.dtype)

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
      out = kernels.fused_attention(q, k, v, impl)
      return out.reshape(out.shape[:2] + (-1,))
    rows = word_weights.shape[0]
    refs = word_weights.shape[1] if word_weights.ndim == 3 else 1
    widened = kernels.word_map_head_width(self.dim_head, refs)
    if (not self.fused_word_maps
        or impl == 'cudnn' and widened > max(128, kernels.cudnn_widest_head())):
      # No room for the word columns in this GPU's cuDNN head (every one takes 128):
      # the maps' rows alone through XLA, beside the fused output.
      probs = attention_probs(qh[-rows:], k[-rows:].transpose(0, 2, 1, 3))
      out = kernels.fused_attention(q, k, v, impl)
      maps = word_attention_map(probs, word_weights, *spatial)
    else:
      out, maps = kernels.fused_attention_with_word_maps(q, k, v, word_weights, impl)
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
    out = kernels.fused_attention(*(self._heads_last(x) for x in (q, k, v)), impl)
    return out.reshape(q.shape)
