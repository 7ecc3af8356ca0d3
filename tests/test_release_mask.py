"""The release's mask strategies against its own `mask_generation` (fixtures)."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realcustom_jax import mask_strategies as rm
from realcustom_jax.attention import word_attention_map

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'release_mask',
                       'release_mask.npz')


@pytest.fixture(scope='module')
def release():
  with np.load(FIXTURE) as f:
    return {k: f[k] for k in f.files}


def _word_maps(release):
  """Our per-layer word maps, from the same attention probabilities the release read."""
  b, _, _, n_tokens = release['cross_0'].shape
  weights = jnp.zeros((b, n_tokens)).at[:, release['target_tokens']].set(1.0)
  return [word_attention_map(jnp.asarray(release[f'cross_{i}']), weights, int(h), int(w))
          for i, (h, w) in enumerate(release['cross_sizes'])]


def _self_maps(release):
  return [jnp.asarray(release[k]) for k in sorted(release) if k.startswith('self_')]


def test_every_strategy_matches_the_release(release):
  """Ours (float32) vs the release run in float64 within 1e-6, and in float32 within 4e-6.

  The release's own float32 rounding is the larger error: on these flat maps the
  min-max normalisations amplify a few ulps of its sums to ~3e-6 (ours stays within
  1e-6 of its float64 run); max-normalised and unrefined cases agree within 1e-6 in
  float32 as well.
  """
  assert str(release['release_commit']) == '28a718e70ff0cac6a35cd3285b663a63e2510227'
  maps, self_maps = _word_maps(release), _self_maps(release)
  size = tuple(int(s) for s in release['target_size'])
  worst = dict.fromkeys(('f64', 'f32', 'f32_no_min_max'), 0.0)
  failures = []
  for i, (mode_str, use_self, scope) in enumerate(
      zip(release['modes'], release['use_self'], release['scopes'])):
    mode = rm.check_mode(str(mode_str).split('|'))
    selfs = self_maps if use_self else None
    ours = np.asarray(rm.release_mask(maps, float(scope), size, mode, selfs))
    # The map before selection, against the release run with scope 1 (keeps every value).
    selfmap = rm.self_map(selfs, size[0] * size[1], mode) if selfs else None
    before = np.asarray(rm.normalized_cross_map(rm.stack_cross_maps(maps, size), mode,
                                                selfmap)).reshape(ours.shape)
    diff = lambda key: max(float(np.max(np.abs(ours - release[f'masks{key}'][i]))),
                           float(np.max(np.abs(before - release[f'before_selection{key}'][i]))))
    d64, d32 = diff('_f64'), diff('')
    worst['f64'], worst['f32'] = max(worst['f64'], d64), max(worst['f32'], d32)
    min_max = ('min_max_norm' in mode or 'min_max_per_channel' in mode) and selfs
    if not min_max:
      worst['f32_no_min_max'] = max(worst['f32_no_min_max'], d32)
    if d64 > 1e-6 or d32 > 4e-6 or (not min_max and d32 > 1e-6):
      failures.append((str(mode_str), bool(use_self), float(scope), d64, d32))
  assert not failures, failures
  print('release mask parity (max abs):', {k: f'{v:.2e}' for k, v in worst.items()})
  # The fixture covers what it claims: every name, both scopes, with and without self maps.
  names = set('|'.join(release['modes']).split('|'))
  assert names >= set(rm.RELEASE_MASK_MODES)
  assert len(release['modes']) == 126 and release['use_self'].any()


def test_the_fixture_keeps_what_the_mode_says(release):
  """Independent of our code: top-k counts, binary values and thresholds in the release."""
  n = int(np.prod(release['target_size']))
  for mode, scope, mask in zip(release['modes'], release['scopes'], release['masks']):
    flat = mask.reshape(mask.shape[0], -1)
    if 'threshold' not in mode:
      assert np.all(np.count_nonzero(flat, axis=1) == int(n * scope)), mode
    if 'binary' in mode and 'threshold' not in mode:
      assert set(np.unique(flat)) <= {0.0, 1.0}, mode


def test_mask_scope_is_traced(release):
  maps = _word_maps(release)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def masks(maps, scope):
    return rm.release_mask(maps, scope, (6, 8), ('min_max_per_channel', 'binary'))

  counts = [np.count_nonzero(np.asarray(masks(maps, s))[0]) for s in (0.25, 0.5, 0.7, 1.0)]
  assert counts == [12, 24, 33, 48]


def test_multi_reference_masks_are_per_reference(release):
  """(B, R, h, w) word maps give each reference the mask it would get alone."""
  one = _word_maps(release)
  other = [m[:, ::-1] ** 2 for m in one]  # another word's maps
  both = [jnp.stack([a, b], axis=1) for a, b in zip(one, other)]
  self_maps = _self_maps(release)
  mode = ('max_norm', 'selfmap_max_norm')
  out = rm.release_mask(both, 0.3, (6, 8), mode, self_maps)
  chex.assert_shape(out, (2, 2, 6, 8))
  for r, maps in enumerate((one, other)):
    np.testing.assert_array_equal(out[:, r], rm.release_mask(maps, 0.3, (6, 8), mode,
                                                             self_maps))
  assert not np.allclose(out[:, 0], out[:, 1])


def test_ties_are_broken_by_position():
  flat = jnp.ones((1, 2, 4))  # every position ties
  out = np.asarray(rm.release_mask([flat], 0.5, (2, 4), ('binary',)))
  np.testing.assert_array_equal(out[0], [[1, 1, 1, 1], [0, 0, 0, 0]])


def test_mode_names_are_canonical_and_inert_names_change_nothing(release):
  assert rm.check_mode(['binary', 'max_norm']) == rm.check_mode(('max_norm', 'binary'))
  assert rm.check_mode('max_norm') == ('max_norm',)
  maps = _word_maps(release)
  plain = rm.release_mask(maps, 0.3, (6, 8), ('min_max_norm',))
  inert = rm.release_mask(maps, 0.3, (6, 8), ('min_max_norm',) + rm.INERT_MODES)
  np.testing.assert_array_equal(plain, inert)
  assert not rm.uses_self_maps(rm.INERT_MODES)
  assert rm.uses_self_maps(('max_norm', 'selfmap_max_norm'))


@pytest.mark.parametrize('mode, scope, message', [
    (('max_norm', 'maxnorm'), 0.3, 'maxnorm'), ((), 0.3, 'mode'),
    (('max_norm',), 1.5, 'mask_scope'), (('max_norm',), -0.1, 'mask_scope')])
def test_bad_modes_and_scopes_are_refused(mode, scope, message):
  with pytest.raises(ValueError, match=message):
    rm.release_mask([jnp.ones((1, 2, 2))], scope, (2, 2), mode)
