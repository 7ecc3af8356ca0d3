"""Attention additions for the release: self-attention maps, several reference subjects."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realcustom_jax import attention
from realcustom_jax import kernels

B, HEADS, DIM_HEAD, H, W, N_TEXT, N_IMAGE, REFS = 2, 2, 4, 3, 4, 5, 3, 2
WIDTH = HEADS * DIM_HEAD


def _normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))


@pytest.fixture(scope='module')
def inputs():
  rng = np.random.default_rng(0)
  return dict(
      hidden=_normal(rng, B, H * W, WIDTH), context=_normal(rng, B, N_TEXT, WIDTH),
      refs=_normal(rng, B, REFS, N_IMAGE, WIDTH),
      token_mask=jnp.asarray(rng.uniform(size=(B, REFS, N_IMAGE)) > 0.3),
      scopes=jnp.asarray(rng.uniform(size=(B, REFS, H * 2, W * 2)), jnp.float32),
      words=jnp.asarray(rng.uniform(size=(B, REFS, N_TEXT)) > 0.5, jnp.float32))


def test_self_attention_maps_are_sown_only_when_asked_for(inputs):
  layer = attention.Attention(WIDTH, HEADS, DIM_HEAD)
  params = {'params': layer.init(jax.random.PRNGKey(0), inputs['hidden'])['params']}
  plain, state = layer.apply(params, inputs['hidden'], mutable=['intermediates'])
  assert not state  # nothing stored (nor computed, with cuDNN) by default
  out, state = layer.apply(params, inputs['hidden'],
                           mutable=[attention.SELF_ATTENTION_MAPS])
  np.testing.assert_array_equal(out, plain)
  (probs,) = jax.tree.leaves(state)
  chex.assert_shape(probs, (B, HEADS, H * W, H * W))
  p = params['params']
  heads = lambda x: x.reshape(B, H * W, HEADS, DIM_HEAD).transpose(0, 2, 1, 3)
  q = heads(inputs['hidden'] @ p['to_q']['kernel'])
  k = heads(inputs['hidden'] @ p['to_k']['kernel'])
  np.testing.assert_allclose(probs, jax.nn.softmax(q @ k.swapaxes(-1, -2) / 2.0), atol=1e-6)
  # attn1 of an only_cross_attention block (given a context) sows none.
  cross = attention.Attention(WIDTH, HEADS, DIM_HEAD)
  _, state = cross.apply(params, inputs['hidden'], inputs['context'],
                         mutable=[attention.SELF_ATTENTION_MAPS])
  assert not state


def test_several_references_each_attend_alone_gated_by_their_scope(inputs):
  layer = attention.Attention(WIDTH, HEADS, DIM_HEAD, is_cross=True)
  spatial = (H, W)
  params = {'params': layer.init(jax.random.PRNGKey(1), inputs['hidden'], inputs['context'],
                                 visual_tokens=inputs['refs'][:, 0], spatial=spatial)['params']}

  @jax.jit
  def run(x):
    apply = lambda **kw: layer.apply(params, x['hidden'], x['context'], spatial=spatial,
                                     mutable=['intermediates'], **kw)
    both = apply(visual_tokens=x['refs'], visual_token_mask=x['token_mask'],
                 scope_mask=x['scopes'], word_weights=x['words'])
    alone = [apply(visual_tokens=x['refs'][:, r], visual_token_mask=x['token_mask'][:, r],
                   scope_mask=x['scopes'][:, r], word_weights=x['words'][:, r])
             for r in range(REFS)]
    # A reference whose scope is zero adds nothing.
    zero = x['scopes'].at[:, 1].set(0.0)
    first = apply(visual_tokens=x['refs'][:, :1], scope_mask=zero[:, :1])[0]
    with_zero = apply(visual_tokens=x['refs'][:, :2], scope_mask=zero[:, :2])[0]
    return both, alone, apply()[0], first, with_zero

  (both, both_state), alone, text_only, first, with_zero = run(inputs)
  # to_out_0 is affine: the references' contributions add up after it.
  expected = text_only + sum(out - text_only for out, _ in alone)
  np.testing.assert_allclose(both, expected, atol=1e-5)
  assert np.max(np.abs(both - text_only)) > 1e-2  # the references do contribute
  (maps,) = jax.tree.leaves(both_state)
  chex.assert_shape(maps, (B, REFS, H, W))
  for r, (_, state) in enumerate(alone):
    np.testing.assert_allclose(maps[:, r], jax.tree.leaves(state)[0], atol=1e-6)
  np.testing.assert_allclose(first, with_zero, atol=1e-6)


# ---- Fused kernels (issue 13): values and gradients against the einsum path ----

def _reference_attention(q, k, v, key_mask):
  """The einsum path in the fused kernels' (B, T, N, D) layout."""
  heads_second = lambda x: x.transpose(0, 2, 1, 3)
  return heads_second(attention.visual_cross_attention(
      heads_second(q), heads_second(k), heads_second(v), key_mask))


@pytest.mark.parametrize('impl, width, masked', [
    # 'xla' runs the call the cuDNN path makes (selected keys first, key lengths) through
    # JAX's own kernel: cuDNN needs a GPU, the call and its arguments do not.
    ('xla', 40, True), ('xla', 40, False),
    # The TPU kernel in Pallas' interpret mode: 40 queries and 77 keys padded to its
    # 128-row tiles, width 160 padded to 256, unselected keys as segment ids.
    ('pallas', 160, True),
])
def test_fused_attention_matches_the_einsum_path(impl, width, masked):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  b, t, s, n = 2, 40, 77, 1
  q, k, v = (_normal(rng, b, length, n, width) for length in (t, s, s))
  key_mask = None
  if masked:  # an unordered selection, and a row with none selected (image dropout)
    key_mask = jnp.asarray(rng.uniform(size=(b, s)) > 0.4).at[1].set(False)
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  fused = lambda q, k, v: kernels.fused_attention(q, k, v, impl, key_mask)
  reference = lambda q, k, v: _reference_attention(q, k, v, key_mask)
  want, want_grads = jax.value_and_grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  with pltpu.force_tpu_interpret_mode():
    got, got_grads = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1, 2)))(q, k, v)
    out = jax.jit(fused)(q, k, v)
  chex.assert_shape(out, (b, t, n, width))
  chex.assert_trees_all_close(out, reference(q, k, v), atol=2e-5)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  chex.assert_trees_all_close(got_grads, want_grads, atol=5e-5)
  if masked:
    np.testing.assert_array_equal(out[1], 0.0)


@pytest.mark.parametrize('refs', [False, True])
def test_fused_layers_match_xla_and_compute_word_maps_for_the_last_rows_only(inputs, refs,
                                                                            cudnn_on_cpu):
  # attn2 with the visual branch (top-k mask) and word maps for the last row only, as
  # the sampler's [uncond, T2I] call asks; 'cudnn' is run by JAX's XLA kernel on CPU.
  spatial = (H, W)
  xla = attention.Attention(WIDTH, HEADS, DIM_HEAD, is_cross=True)
  fused = attention.Attention(WIDTH, HEADS, DIM_HEAD, is_cross=True, attention_impl='cudnn')
  vis, mask = inputs['refs'][:, 0], inputs['token_mask'][:, 0]
  params = {'params': xla.init(jax.random.PRNGKey(2), inputs['hidden'], inputs['context'],
                               visual_tokens=vis, spatial=spatial)['params']}
  words = inputs['words'] if refs else inputs['words'][:, 0]
  run = lambda layer, rows: layer.apply(
      params, inputs['hidden'], inputs['context'], spatial=spatial, visual_tokens=vis,
      visual_token_mask=mask, word_weights=words[-rows:], mutable=['intermediates'])
  want, want_state = run(xla, B)
  got, state = run(fused, 1)
  calls = [(impl, 'key_value_seq_lengths' in kw, q.shape[-1], v.shape[-1], kw['scale'])
           for impl, q, _, v, kw in cudnn_on_cpu]
  # ONE text call (5 tokens padded to 8, so with a key length) whose heads are widened
  # by the word columns (4 + 1 or 4 + 2, to 8); then the visual call (the top-k).
  assert calls == [('cudnn', True, 8, 8, DIM_HEAD ** -0.5),
                   ('cudnn', True, DIM_HEAD, DIM_HEAD, DIM_HEAD ** -0.5)]
  np.testing.assert_allclose(got, want, atol=1e-5)
  (maps,), (want_maps,) = (jax.tree.leaves(s) for s in (state, want_state))
  chex.assert_shape(maps, (1,) + ((REFS,) if refs else ()) + (H, W))
  assert np.max(np.asarray(maps)) > 0.05  # the word does get attention
  np.testing.assert_allclose(maps, want_maps[-1:], atol=1e-6)


@pytest.mark.parametrize('dim_head, fused_word_maps', [
    # A 128-wide head plus a word column would be 136: wider than an A100's (or, here,
    # the CPU's) cuDNN takes.
    (128, True),
    (8, False),  # the benchmarks' switch back to the way before (--nofused_word_maps)
])
def test_word_maps_leave_the_fused_kernel_where_no_widened_head_fits(
    inputs, dim_head, fused_word_maps, cudnn_on_cpu):
  # The text call keeps the head's width and the maps come from the probabilities of
  # the maps' rows.
  spatial = (H, W)
  width = HEADS * dim_head
  rng = np.random.default_rng(5)
  hidden, context = _normal(rng, B, H * W, width), _normal(rng, B, N_TEXT, width)
  xla = attention.Attention(width, HEADS, dim_head, is_cross=True)
  fused = attention.Attention(width, HEADS, dim_head, is_cross=True, attention_impl='cudnn',
                              fused_word_maps=fused_word_maps)
  params = {'params': xla.init(jax.random.PRNGKey(3), hidden, context)['params']}
  words = inputs['words'][:, 0]
  run = lambda layer: layer.apply(params, hidden, context, spatial=spatial,
                                  word_weights=words[-1:], mutable=['intermediates'])
  (want, want_state), (got, state) = run(xla), run(fused)
  assert [v.shape[-1] for _, _, _, v, _ in cudnn_on_cpu] == [dim_head]
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(jax.tree.leaves(state)[0], jax.tree.leaves(want_state)[0][-1:],
                             atol=1e-6)


@pytest.mark.parametrize('impl, dtype, atol, map_atol', [
    ('xla', jnp.float32, 2e-6, 1e-7),
    # bfloat16 as the sampler runs: the maps carry the kernel's output rounding (2e-4
    # here, of maps up to 0.09).
    ('xla', jnp.bfloat16, 4e-3, 1e-3),
    ('pallas', jnp.float32, 2e-6, 1e-7),  # the TPU kernel, interpret mode, width 41 -> 48
])
def test_word_maps_from_the_fused_kernel_match_the_probabilities(impl, dtype, atol,
                                                                 map_atol):
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(6)
  b, t, s, n, d, rows = 3, 64, 77, 2, 40, 2
  q, k, v = (_normal(rng, b, length, n, d).astype(dtype) for length in (t, s, s))
  words = jnp.zeros((rows, s)).at[0, 3].set(1.0).at[1, 5:7].set(1.0)
  heads_second = lambda x: x.transpose(0, 2, 1, 3)
  want_out, probs = attention.text_cross_attention(*(heads_second(x) for x in (q, k, v)))
  want_maps = attention.word_attention_map(probs[-rows:], words, 8, 8).reshape(rows, t)
  with pltpu.force_tpu_interpret_mode():
    out, maps = jax.jit(functools.partial(
        kernels.fused_attention_with_word_maps, impl=impl))(q, k, v, words)
  chex.assert_shape(out, (b, t, n, d))
  chex.assert_shape(maps, (rows, t))
  assert maps.dtype == jnp.float32 and out.dtype == dtype
  chex.assert_trees_all_close(out.astype(jnp.float32),
                              heads_second(want_out).astype(jnp.float32), atol=atol)
  np.testing.assert_allclose(maps, want_maps, atol=map_atol)
  assert np.max(want_maps) > 0.02  # a map worth comparing


@pytest.mark.parametrize('requested, head_dim, q_len, dtype, platform, want', [
    ('auto', 40, 4096, jnp.bfloat16, 'tpu', 'pallas'),
    ('auto', 160, 256, jnp.float32, 'tpu', 'pallas'),  # width padded, f32 fine on TPU
    ('auto', 40, 64, jnp.bfloat16, 'tpu', 'xla'),  # under one 128-row tile
    ('auto', 40, 4096, jnp.float32, 'gpu', 'xla'),  # cuDNN takes half precision only
    ('auto', 40, 4096, jnp.float16, 'gpu', 'cudnn'),
    ('pallas', 40, 64, jnp.float32, 'gpu', 'pallas'),  # as asked
])
def test_auto_picks_the_fused_kernel_per_layer(requested, head_dim, q_len, dtype, platform,
                                               want):
  import types  # pylint: disable=g-import-not-at-top
  device = types.SimpleNamespace(platform=platform, compute_capability='9.0',
                                 device_kind='TPU v5 lite' if platform == 'tpu'
                                 else 'NVIDIA H100 80GB HBM3')
  assert kernels.layer_attention_impl(requested, head_dim, q_len, dtype, device) == want


def test_unknown_attention_impl_is_refused():
  with pytest.raises(ValueError, match="attention_impl must be one of .*'flash'"):
    kernels.layer_attention_impl('flash', 40, 4096)


@pytest.mark.parametrize('masked', [False, True])
def test_cudnn_call_gets_even_padded_lengths_and_matches(masked, cudnn_on_cpu):
  # cuDNN's backward pass takes even sequence lengths only; 39 queries and the 77 CLIP
  # text tokens are padded to multiples of 8 and the padding is kept out (JAX's XLA
  # kernel stands in for cuDNN behind the same call on a CPU).
  rng = np.random.default_rng(4)
  b, t, s, n, d = 2, 39, 77, 2, 8
  q, k, v = (_normal(rng, b, length, n, d) for length in (t, s, s))
  key_mask = jnp.asarray(rng.uniform(size=(b, s)) > 0.4) if masked else None
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  fused = lambda q, k, v: kernels.fused_attention(q, k, v, 'cudnn', key_mask)
  reference = lambda q, k, v: _reference_attention(q, k, v, key_mask)
  got, got_grads = jax.value_and_grad(loss(fused), argnums=(0, 1, 2))(q, k, v)
  want, want_grads = jax.value_and_grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  calls = [(impl, q.shape[1], k.shape[1]) for impl, q, k, _, _ in cudnn_on_cpu]
  assert calls and all(c == ('cudnn', 40, 80) for c in calls)
  chex.assert_shape(fused(q, k, v), (b, t, n, d))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  chex.assert_trees_all_close(got_grads, want_grads, atol=5e-5)


# ---- Pallas under a batch-sharded mesh: per device, not gathered onto one ----

def _mesh(data, fsdp):
  from jax.sharding import Mesh  # pylint: disable=g-import-not-at-top
  return Mesh(np.asarray(jax.devices()[:data * fsdp]).reshape(data, fsdp), ('data', 'fsdp'))


@pytest.mark.parametrize('batch, want_axes', [
    (4, ('data', 'fsdp')), (2, ('data',)), (3, ()),  # 3: no axis divides it, runs whole
])
def test_per_batch_shard_splits_the_batch_over_the_mesh_axes_that_divide_it(batch, want_axes):
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = _mesh(2, 2)
  seen = []

  def kernel(x, extra):
    seen.append((x.shape[0], extra['ids'].shape[0]))
    return x * 2.0 + extra['ids'][:, None]

  x = jnp.arange(batch * 3, dtype=jnp.float32).reshape(batch, 3)
  ids = jnp.arange(batch, dtype=jnp.float32)
  with kernels.batch_mesh(mesh):
    out = jax.jit(lambda x, ids: kernels.per_batch_shard(kernel, x, {'ids': ids}))(x, ids)
  np.testing.assert_array_equal(out, x * 2.0 + ids[:, None])
  per_device = batch // int(np.prod([dict(mesh.shape)[a] for a in want_axes]))
  assert seen == [(per_device, per_device)]
  if want_axes:
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, P(want_axes)), 2)
  # Without a mesh the kernel sees the whole batch.
  seen.clear()
  jax.jit(lambda x, ids: kernels.per_batch_shard(kernel, x, {'ids': ids}))(x, ids)
  assert seen == [(batch, batch)]


def test_pallas_attention_runs_per_device_in_a_batch_sharded_step(pallas_rows):
  # Unwrapped, XLA's SPMD partitioner gathers a Pallas call's sharded inputs onto one
  # device (on CPU devices the gather deadlocks); under the mesh each device runs the
  # kernel on its own rows, and values and gradients are those of the einsum path.
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = _mesh(2, 2)
  rng = np.random.default_rng(7)
  b, t, s, n, d = 4, 40, 77, 2, 8
  q, k, v = (_normal(rng, b, length, n, d) for length in (t, s, s))
  key_mask = jnp.asarray(rng.uniform(size=(b, s)) > 0.4)
  on_mesh = NamedSharding(mesh, P(('data', 'fsdp')))
  qs, ks, vs = (jax.device_put(x, on_mesh) for x in (q, k, v))
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
  fused = lambda q, k, v: kernels.fused_attention(q, k, v, 'pallas', key_mask)
  with pltpu.force_tpu_interpret_mode(), jax.set_mesh(mesh):
    got, got_grads = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1, 2)))(qs, ks, vs)
  want, want_grads = jax.value_and_grad(
      loss(lambda q, k, v: _reference_attention(q, k, v, key_mask)), argnums=(0, 1, 2))(q, k, v)
  assert pallas_rows and set(pallas_rows) == {1}  # 4 rows over 2 x 2 devices
  np.testing.assert_allclose(got, want, rtol=1e-5)
  chex.assert_trees_all_close(got_grads, want_grads, atol=5e-5)
  assert got_grads[0].sharding.is_equivalent_to(on_mesh, 4)
