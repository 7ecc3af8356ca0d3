"""Attention additions for the release: self-attention maps, several reference subjects."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realcustom_jax import attention

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
