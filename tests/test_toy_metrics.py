"""The toy metrics read text control and subject identity back from pixels."""
import numpy as np
import pytest

from toy import metrics as toy_metrics
from toy import world as toy_world

REF = toy_world.Scene('square', 'red', 'white', 'green', (6.0, 7.0), 10.0)


def _draw(**changes):
  fields = dict(shape=REF.shape, body=REF.body, accent=REF.accent, background=REF.background,
                center=REF.center, size=REF.size)
  fields.update(changes)
  return toy_world.render(toy_world.Scene(**fields), 16)


def test_quantize_recovers_palette_colors_under_noise():
  image, _ = _draw()
  noisy = np.clip(image.astype(int) + np.random.default_rng(0).integers(-20, 21, image.shape),
                  0, 255).astype(np.uint8)
  assert np.array_equal(toy_metrics.quantize(noisy), toy_metrics.quantize(image))


def test_perfect_customization_scores_one_everywhere():
  reference, _ = _draw()
  generated, mask = _draw(background='blue', center=(9.0, 9.0))
  r = toy_metrics.score_image(generated, 'blue', reference, REF.identity,
                              scope=mask.astype(np.float32))
  assert r == dict(text=1.0, bg_frac=pytest.approx(1 - mask.mean()), sim=pytest.approx(1.0),
                   id=1.0, scope_in_object=pytest.approx(1.0))


def test_copying_the_reference_background_fails_text_control_only():
  reference, _ = _draw()
  # The paradox: the subject is right but the background is the reference's, not the
  # prompt's 'blue'.
  r = toy_metrics.score_image(reference, 'blue', reference, REF.identity)
  assert r['text'] == 0.0 and r['bg_frac'] == 0.0
  assert r['sim'] == pytest.approx(1.0) and r['id'] == 1.0


def test_another_identity_lowers_similarity():
  reference, _ = _draw()
  other, _ = _draw(body='yellow', accent='black', background='blue')
  half, _ = _draw(accent='black', background='blue')
  r_other = toy_metrics.score_image(other, 'blue', reference, REF.identity)
  r_half = toy_metrics.score_image(half, 'blue', reference, REF.identity)
  assert r_other['text'] == 1.0 and r_other['sim'] == 0.0 and r_other['id'] == 0.0
  assert 0.3 < r_half['sim'] < 0.7 and r_half['id'] == 0.0


def test_an_empty_image_has_no_subject():
  blank = np.zeros((16, 16, 3), np.uint8) + np.asarray(toy_world.PALETTE['blue'], np.uint8)
  reference, _ = _draw()
  r = toy_metrics.score_image(blank, 'blue', reference, REF.identity)
  assert r['text'] == 1.0 and r['sim'] == 0.0 and r['id'] == 0.0


def test_summarize_gives_mean_and_standard_error():
  s = toy_metrics.summarize([{'a': 0.0}, {'a': 1.0}, {'a': 1.0}, {'a': 0.0}])
  assert s['n'] == 4 and s['a'] == 0.5
  assert s['a_se'] == pytest.approx(np.std([0, 1, 1, 0], ddof=1) / 2)
  with pytest.raises(ValueError):
    toy_metrics.summarize([])


def test_summarize_over_seeds_reports_the_mean_of_seed_means_and_their_spread():
  rows = {0: [{'id': 1.0}, {'id': 1.0}], 1: [{'id': 0.0}, {'id': 1.0}],
          2: [{'id': 0.0}, {'id': 0.0}]}
  s = toy_metrics.summarize_over_seeds(rows)
  assert s['training_seeds'] == [0, 1, 2] and s['n'] == 2
  assert np.isclose(s['id'], 0.5)
  assert s['id_per_seed'] == [1.0, 0.5, 0.0]
  assert np.isclose(s['id_seed_sd'], 0.5)
  # Per-seed sampling errors 0, 0.5, 0 combined: sqrt(0.25) / 3.
  assert np.isclose(s['id_se'], 0.5 / 3)
  with pytest.raises(ValueError):
    toy_metrics.summarize_over_seeds({})


def test_a_difference_within_the_seed_spread_is_not_evidence():
  a = {'id': 0.6, 'id_se': 0.01, 'id_seed_sd': 0.2, 'training_seeds': [0, 1, 2]}
  b = {'id': 0.5, 'id_se': 0.01, 'id_seed_sd': 0.0, 'training_seeds': [0, 1, 2]}
  assert not toy_metrics.difference_is_evidence(a, b)
  a['id_seed_sd'] = 0.01
  assert toy_metrics.difference_is_evidence(a, b)
  assert not toy_metrics.difference_is_evidence(b, a)
