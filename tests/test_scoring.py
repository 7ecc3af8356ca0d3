"""Adaptive scoring module (Eqs. 5-10)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realcustom_jax.scoring import AdaptiveScoring, fuse_scores

B, NT, CT, C, H, NI, CI = 2, 7, 12, 4, 5, 11, 9  # odd sizes catch transposed axes


def _inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k[0], (B, NT, CT)), jax.random.normal(k[1], (B, C, H, H)),
          jax.random.normal(k[2], (B, NI, CI)))


@pytest.fixture(scope='module')
def module_and_params():
  module = AdaptiveScoring(hidden=16)
  text, latents, image = _inputs()
  params = module.init(jax.random.PRNGKey(1), text, latents, jnp.full((B,), 0.5), image,
                       0.8)['params']
  return module, params


def test_shapes_normalisation_and_selection(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  out = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.8)
  chex.assert_shape(out.features, (B, NI, CI))
  chex.assert_shape([out.selected, out.scores], (B, NI))
  chex.assert_type(out.selected, bool)
  np.testing.assert_allclose(np.asarray(out.scores.sum(-1)), 1.0, rtol=1e-6)
  assert np.asarray(out.selected).sum(-1).tolist() == [int(0.8 * NI)] * B
  # The selected tokens are the highest-scoring ones (Eq. 10).
  for s, m in zip(np.asarray(out.scores), np.asarray(out.selected)):
    assert s[m].min() >= s[~m].max()
  # Eq. 9.
  np.testing.assert_allclose(np.asarray(out.features),
                             np.asarray(image * (1 + out.scores[..., None])), rtol=1e-6)


def test_eq9_scales_the_tokens_it_is_given(module_and_params):
  """The model passes the projected tokens: Eq. 9 scales them, the nets read f_ci."""
  module, params = module_and_params
  text, latents, image = _inputs()
  tokens = jax.random.normal(jax.random.PRNGKey(7), (B, NI, 6))
  out = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.8,
                     tokens=tokens)
  plain = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.8)
  np.testing.assert_array_equal(np.asarray(out.scores), np.asarray(plain.scores))
  np.testing.assert_allclose(np.asarray(out.features),
                             np.asarray(tokens * (1 + out.scores[..., None])), rtol=1e-6)


def test_per_example_gamma_num(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  out = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image,
                     jnp.array([0.3, 1.0]))
  assert np.asarray(out.selected).sum(-1).tolist() == [3, NI]


def test_gradients_reach_both_score_nets_through_eq9(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  target = jax.random.normal(jax.random.PRNGKey(5), (B, NI, CI))

  def loss(p):
    out = module.apply({'params': p}, text, latents, jnp.full((B,), 0.5), image, 0.8)
    return jnp.sum(out.features * target)

  grads = jax.grad(loss)(params)
  for net in ('text_score_net', 'visual_score_net'):
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads[net]))
    assert norm > 0, net
  for pool in ('text_pool', 'visual_pool'):
    assert float(jnp.abs(grads[pool]['kernel']).sum()) > 0, pool


def test_fusion_moves_from_text_to_visual_with_sqrt_alpha_bar(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  other_text, other_latents, _ = _inputs(seed=9)
  scores = lambda t, z, s: np.asarray(module.apply(
      {'params': params}, t, z, jnp.full((B,), s), image, 0.8).scores)
  # sqrt(abar) = 0 (pure noise): only the text decides; the latents do not matter.
  np.testing.assert_allclose(scores(text, latents, 0.0), scores(text, other_latents, 0.0),
                             rtol=1e-6)
  assert np.abs(scores(text, latents, 0.0) - scores(other_text, latents, 0.0)).max() > 1e-6
  # sqrt(abar) = 1 (clean): only the latents decide.
  np.testing.assert_allclose(scores(text, latents, 1.0), scores(other_text, latents, 1.0),
                             rtol=1e-6)
  assert np.abs(scores(text, latents, 1.0) - scores(text, other_latents, 1.0)).max() > 1e-6


def test_fuse_scores_is_eq8():
  st, sv = jnp.array([[1.0, 2.0]]), jnp.array([[3.0, -1.0]])
  np.testing.assert_allclose(np.asarray(fuse_scores(st, sv, jnp.array([0.25]))),
                             [[0.75 * 1 + 0.25 * 3, 0.75 * 2 - 0.25]])
  np.testing.assert_allclose(np.asarray(fuse_scores(st, sv, None, 'mean')), [[2.0, 0.5]])


def test_traced_gamma_num_does_not_recompile(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def select(gamma):
    return module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image,
                        gamma).selected

  counts = [int(select(g)[0].sum()) for g in (0.3, 0.55, 0.8, 1.0)]
  assert counts == [3, 6, 8, 11]


def test_unknown_fusion_is_refused():
  text, latents, image = _inputs()
  with pytest.raises(ValueError, match='fusion'):
    AdaptiveScoring(fusion='sum').init(jax.random.PRNGKey(0), text, latents,
                                       jnp.ones((B,)), image, 0.5)


def test_priority_replaces_the_learned_order_but_not_eq9(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  learned = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.5)
  # An order opposite to the learned scores: Eq. 10 must follow it, Eq. 9 must not.
  priority = -learned.scores
  fixed = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.5,
                       priority=priority)
  k = int(0.5 * NI)
  for p, m in zip(np.asarray(priority), np.asarray(fixed.selected)):
    assert m.sum() == k and p[m].min() >= p[~m].max()
  assert not np.array_equal(np.asarray(fixed.selected), np.asarray(learned.selected))
  chex.assert_trees_all_close(fixed.features, learned.features)
  chex.assert_trees_all_close(fixed.scores, learned.scores)


def test_gain_off_leaves_the_tokens_unscaled_and_the_selection_unchanged(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  on = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.8)
  off = module.clone(gain=False).apply({'params': params}, text, latents,
                                       jnp.full((B,), 0.5), image, 0.8)
  chex.assert_trees_all_close(off.features, image)
  assert np.array_equal(np.asarray(off.selected), np.asarray(on.selected))


def test_scope_pooling_ignores_the_positions_outside_the_scope(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  scope = jnp.zeros((B, H, H)).at[:, :2, :3].set(1.0)
  masked = latents * scope[:, None]
  pooled = module.clone(visual_pool='scope')
  # With the scope, Eq. 6's softmax runs over the 6 inside positions only: what lies
  # outside cannot change the visual scores.
  other = masked + 50.0 * (1.0 - scope[:, None])
  a = pooled.apply({'params': params}, text, masked, jnp.ones((B,)), image, 0.8,
                   latent_scope=scope)
  b = pooled.apply({'params': params}, text, other, jnp.ones((B,)), image, 0.8,
                   latent_scope=scope)
  chex.assert_trees_all_close(a.scores, b.scores, atol=1e-6)
  # The paper's pooling keeps the zeroed positions in the softmax: it differs.
  paper = module.apply({'params': params}, text, masked, jnp.ones((B,)), image, 0.8,
                       latent_scope=scope)
  assert not np.allclose(np.asarray(paper.scores), np.asarray(a.scores), atol=1e-6)
  # An empty scope pools every position (no 0 / 0).
  empty = pooled.apply({'params': params}, text, latents, jnp.ones((B,)), image, 0.8,
                       latent_scope=jnp.zeros((B, H, H)))
  assert np.all(np.isfinite(np.asarray(empty.scores)))
  with pytest.raises(ValueError, match='visual_pool'):
    module.clone(visual_pool='nope').apply({'params': params}, text, latents,
                                           jnp.ones((B,)), image, 0.8)


def test_sigmoid_scores_are_per_token_and_keep_every_gradient(module_and_params):
  module, params = module_and_params
  text, latents, image = _inputs()
  sig = module.clone(normalization='sigmoid')
  soft = module.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.8)
  out = sig.apply({'params': params}, text, latents, jnp.full((B,), 0.5), image, 0.8)
  # Same order, so Eq. 10 keeps the same tokens; S is each token's own sigmoid.
  assert np.array_equal(np.asarray(out.selected), np.asarray(soft.selected))
  assert np.all((np.asarray(out.scores) > 0) & (np.asarray(out.scores) < 1))
  assert not np.allclose(np.asarray(out.scores.sum(-1)), 1.0)
  np.testing.assert_allclose(np.asarray(out.features),
                             np.asarray(image * (1 + out.scores[..., None])), rtol=1e-6)

  def loss(p, normalization):
    o = module.clone(normalization=normalization).apply(
        {'params': p}, text, latents, jnp.full((B,), 0.5), image, 0.8)
    # A loss that one token's S can satisfy: the softmax piles S on it.
    return -jnp.sum(o.features[:, 0])
  for normalization in ('softmax', 'sigmoid'):
    grads = jax.grad(loss)(params, normalization)
    for net in ('text_score_net', 'visual_score_net'):
      assert float(jnp.abs(grads[net]['dense_0']['kernel']).max()) > 0, (normalization, net)
  with pytest.raises(ValueError, match='normalization'):
    module.clone(normalization='nope').apply({'params': params}, text, latents,
                                             jnp.ones((B,)), image, 0.8)


def test_straight_through_selection_is_the_mask_in_value_with_a_gradient_for_every_token():
  from realcustom_jax import attention  # pylint: disable=g-import-not-at-top
  from realcustom_jax.scoring import straight_through_keep, top_fraction_mask
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  scores = jax.random.normal(k[0], (B, NI))
  selected = top_fraction_mask(scores, 0.5)
  keep = straight_through_keep(scores, selected)
  assert np.array_equal(np.asarray(keep), np.asarray(selected, np.float32))
  q = jax.random.normal(k[1], (B, 2, 5, 4))
  kv, vv = jax.random.normal(k[2], (B, 2, NI, 4)), jax.random.normal(k[3], (B, 2, NI, 4))
  # The float keep weights give the masked attention's output...
  chex.assert_trees_all_close(attention.visual_cross_attention(q, kv, vv, keep),
                              attention.visual_cross_attention(q, kv, vv, selected),
                              atol=1e-6)
  # ...and a gradient for the dropped tokens too (the bool mask gives none).
  loss = lambda s: jnp.sum(attention.visual_cross_attention(
      q, kv, vv, straight_through_keep(s, selected)) ** 2)
  grads = np.asarray(jax.grad(loss)(scores))
  assert np.all(grads[~np.asarray(selected)] != 0) and np.all(grads[np.asarray(selected)] != 0)
  # A row with nothing kept (image dropout) contributes zero, as with a bool mask.
  none = jnp.zeros((B, NI))
  assert float(jnp.abs(attention.visual_cross_attention(q, kv, vv, none)).max()) == 0.0
