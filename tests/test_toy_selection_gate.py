"""Gate A's measurements: token object shares, fixed orders, selection precision."""
import numpy as np
import pytest

from realcustom_jax import selection
from toy import selection_gate
from toy import world as toy_world


def test_token_object_area_follows_the_patch_grid():
  masks = np.zeros((1, 16, 16), bool)
  masks[0, :4, :4] = True  # token 0 full
  masks[0, 4:6, 12:16] = True  # token 7 half
  areas = selection_gate.token_object_area(masks, 16)
  expected = np.zeros(16)
  expected[0], expected[7] = 1.0, 0.5
  np.testing.assert_allclose(areas[0], expected)
  with pytest.raises(ValueError, match='tokens'):
    selection_gate.token_object_area(masks, 15)


def test_token_areas_of_a_rendered_subject_add_up_to_its_mask():
  scene = toy_world.eval_cases(16, 1)[0].subject
  _, mask = toy_world.render(scene, 16)
  areas = selection_gate.token_object_area(mask[None], 16)
  assert np.isclose(areas.sum() * 16, mask.sum())


def test_oracle_and_anti_oracle_orders_through_eq10():
  rng = np.random.default_rng(0)
  areas = np.round(rng.uniform(size=(3, 16)), 2)
  k = selection_gate.kept_count(0.5, 16)
  assert k == int(selection.num_selected(0.5, 16)) == 8
  oracle = np.asarray(selection.top_fraction_mask(
      selection_gate.priority('oracle', areas), 0.5))
  anti = np.asarray(selection.top_fraction_mask(
      selection_gate.priority('anti_oracle', areas), 0.5))
  for a, o, n in zip(areas, oracle, anti):
    assert a[o].min() >= a[~o].max() and a[n].max() <= a[~n].min()
  with pytest.raises(ValueError, match='priority'):
    selection_gate.priority('best', areas)


def test_selection_stats_against_random_and_oracle():
  areas = np.array([[1.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 1.0]])
  # Step 0 keeps tokens {0, 1} and {2, 3}; step 1 keeps {2, 3} and {0, 1}.
  sel = np.array([[[1, 1, 0, 0], [0, 0, 1, 1]], [[0, 0, 1, 1], [1, 1, 0, 0]]], bool)
  stats = selection_gate.selection_stats(sel, areas)
  # Shares kept: step 0: 1.0, 0.5; step 1: 0.25, 0.0.
  assert np.isclose(stats['precision'], (1.0 + 0.5 + 0.25 + 0.0) / 4)
  assert np.isclose(stats['random_precision'], areas.mean())
  assert np.isclose(stats['oracle_precision'], (1.0 + 0.5) / 2)  # top 2 of each row
  # Object area not kept: sample 0 loses 0.5/2.5 then 2/2.5; sample 1 none then all.
  np.testing.assert_allclose(stats['dropped_object_area'], [(0.2 + 0.8) / 2, 0.5])


def test_object_token_probe_reads_what_the_features_carry():
  rng = np.random.default_rng(0)
  areas = rng.uniform(size=(200, 16))
  noise = rng.normal(size=(200, 16, 6))
  informative = noise.copy()
  informative[..., 0] += 4.0 * (areas > 0.5)  # one feature says "object"
  good = selection_gate.object_token_probe(informative, areas)
  blind = selection_gate.object_token_probe(noise, areas)
  assert good['accuracy'] > 0.9 and abs(good['majority'] - 0.5) < 0.1
  assert blind['accuracy'] < 0.6
  with pytest.raises(ValueError, match='too few'):
    selection_gate.object_token_probe(noise[:1, :1], areas[:1, :1])
