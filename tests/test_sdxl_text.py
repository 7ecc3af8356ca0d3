"""SDXL text conditioning against the RealCustom release's own text module.

The fixtures (tests/fixtures/sdxl_text/, written by make_fixtures.py there) hold two
tiny random SDXL-shaped CLIP text encoders in diffusers' layout and what the release's
`TextModel(..., ['penultimate_nonorm'])` returned for them.
"""
import functools
import os

import jax
import numpy as np
import pytest

from realcustom_jax.release import sdxl_text
from realcustom_jax.loading import weights

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures', 'sdxl_text')


@pytest.fixture(scope='module')
def release():
  with np.load(os.path.join(FIXTURES, 'outputs.npz')) as f:
    return dict(f)


@pytest.fixture(scope='module')
def text():
  encoder, params, _ = weights.load_text_encoder(os.path.join(FIXTURES, 'text_encoder'))
  encoder_2, params_2, projection = weights.load_text_encoder(
      os.path.join(FIXTURES, 'text_encoder_2'))
  return dict(
      encoder=encoder, encoder_2=encoder_2,
      params={'text_encoder': params, 'text_encoder_2': params_2,
              'text_projection': projection},
      tokenizer=weights.load_tokenizer(FIXTURES, 'tokenizer'),
      tokenizer_2=weights.load_tokenizer(FIXTURES, 'tokenizer_2'))


@pytest.fixture(scope='module')
def encoded(release, text):
  """(context, pooled, projected pooled, text_encoder's last layer) for the release's
  token ids, in one compile."""
  encode = functools.partial(sdxl_text.encode, text['encoder'], text['encoder_2'])

  def both(params, ids, ids_2):
    context, pooled = encode(params, ids, ids_2)
    last = text['encoder'].apply({'params': params['text_encoder']}, ids).last_hidden_state
    return context, pooled, encode(params, ids, ids_2, project_pooled=True)[1], last

  out = jax.jit(both)(text['params'], release['input_ids'], release['input_ids_2'])
  return tuple(np.asarray(a) for a in out)


def test_token_ids_match_the_release_tokenizers(release, text):
  prompts = [str(p) for p in release['prompts']]
  with pytest.warns(UserWarning, match='longer than 77 tokens'):  # the last prompt
    ids, ids_2 = sdxl_text.tokenize(text['tokenizer'], text['tokenizer_2'], prompts)
  np.testing.assert_array_equal(ids, release['input_ids'])
  np.testing.assert_array_equal(ids_2, release['input_ids_2'])
  # tokenizer_2 pads with "!", not the end token: the two id rows differ after it.
  assert (ids != ids_2).any()


def test_features_match_the_release_penultimate_nonorm(release, text, encoded):
  context, pooled, _, last = encoded
  assert context.shape == release['context'].shape == (4, 77, 12 + 20)
  assert pooled.shape == release['pooled'].shape == (4, 20)
  context_diff = np.abs(context - release['context']).max()
  pooled_diff = np.abs(pooled - release['pooled']).max()
  print(f'release text parity: context {context_diff:.2e}, pooled {pooled_diff:.2e}, '
        f'context max {np.abs(release["context"]).max():.2f}')
  assert context_diff <= 1e-5 and pooled_diff <= 1e-5
  # The last layer's (normed) output is something else: the check can tell them apart.
  assert np.abs(last - release['context'][..., :12]).max() > 0.1


def test_projected_pooled_is_transformers_text_embeds(release, text, encoded):
  projected = encoded[2]
  np.testing.assert_allclose(projected, release['projected_pooled'], atol=1e-5, rtol=0)
  assert np.abs(release['projected_pooled'] - release['pooled']).max() > 0.1
  without = {k: v for k, v in text['params'].items() if k != 'text_projection'}
  with pytest.raises(ValueError, match='text_projection'):
    sdxl_text.encode(text['encoder'], text['encoder_2'], without, release['input_ids'],
                     release['input_ids_2'], project_pooled=True)


def test_time_ids_order():
  np.testing.assert_array_equal(sdxl_text.time_ids((768, 1024), (16, 32), (512, 640)),
                                [768, 1024, 16, 32, 512, 640])
  # The release's scripts put the width where diffusers has the height.
  np.testing.assert_array_equal(sdxl_text.release_time_ids(height=768, width=1024),
                                [1024, 768, 0, 0, 1024, 768])
