"""Influence scope (Eq. 11) and the shared top-k selection."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realcustom_jax.mask import aggregate_word_maps, influence_scope
from realcustom_jax.selection import num_selected, top_fraction_mask


def _maps(seed=0, batch=2):
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return [jax.random.uniform(keys[0], (batch, 8, 8)),
          jax.random.uniform(keys[1], (batch, 4, 4)),
          jax.random.uniform(keys[2], (batch, 8, 8))]


@pytest.mark.parametrize('gamma', [0.25, 0.1, 0.5, 0.7, 1.0])
def test_scope_keeps_exactly_k_and_peaks_at_one(gamma):
  scope = np.asarray(influence_scope(_maps(), gamma))
  chex.assert_shape(scope, (2, 8, 8))
  k = int(gamma * 64 + 1e-6)
  for s in scope:
    assert np.count_nonzero(s) == k
    assert s.max() == pytest.approx(1.0)
    assert s.min() >= 0.0


def test_scope_keeps_the_highest_values_and_their_ratios():
  maps = _maps()
  agg = np.asarray(aggregate_word_maps(maps))
  scope = np.asarray(influence_scope(maps, 0.25))
  for a, s in zip(agg, scope):
    kept = s > 0
    assert a[kept].min() >= a[~kept].max()
    np.testing.assert_allclose(s[kept], a[kept] / a.max(), rtol=1e-6)


def test_binary_scope_is_zero_one_with_k_ones():
  scope = np.asarray(influence_scope(_maps(), 0.25, binary=True))
  assert set(np.unique(scope)) == {0.0, 1.0}
  assert (scope.reshape(2, -1).sum(-1) == 16).all()


def test_hand_made_peak_lands_where_it_should():
  """A bump at (6, 1) in every layer (any resolution) must be the scope's maximum."""
  yy, xx = np.mgrid[0:8, 0:8]
  fine = np.exp(-((yy - 6) ** 2 + (xx - 1) ** 2) / 2.0)[None]
  coarse = fine[:, ::2, ::2]  # the same bump seen by a 4x4 layer
  scope = np.asarray(influence_scope([jnp.asarray(fine), jnp.asarray(coarse)], 0.1))[0]
  assert np.unravel_index(scope.argmax(), scope.shape) == (6, 1)
  assert scope[0, 7] == 0.0  # far corner is outside the scope


def test_aggregate_resizes_to_the_largest_map_and_averages():
  small = jnp.full((1, 4, 4), 2.0)
  large = jnp.full((1, 8, 8), 4.0)
  agg = aggregate_word_maps([small, large])
  chex.assert_shape(agg, (1, 8, 8))
  np.testing.assert_allclose(np.asarray(agg), 3.0, rtol=1e-6)


def test_empty_scope_is_zero_not_nan():
  scope = np.asarray(influence_scope(_maps(), 0.0))
  assert np.all(scope == 0.0)


def test_traced_gamma_scope_does_not_retrace():
  maps = _maps()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def scope_fn(maps, gamma):
    return influence_scope(maps, gamma)

  counts = [int(np.count_nonzero(scope_fn(maps, g)[0])) for g in (0.25, 0.5, 0.75)]
  assert counts == [16, 32, 48]


def test_top_fraction_mask_is_exact_under_ties():
  scores = jnp.zeros((3, 10))
  mask = top_fraction_mask(scores, jnp.array([0.3, 0.7, 1.0]))
  assert np.asarray(mask).sum(-1).tolist() == [3, 7, 10]
  assert int(num_selected(0.8, 256)) == 204
