"""toy/baselines.py: the pseudo-word's embedding lives in the project's CLIP text tower."""
import jax.numpy as jnp
import numpy as np

from realcustom_jax import encoders
from toy import baselines


def test_with_token_embedding_replaces_one_row_and_changes_that_tokens_feature(
    tiny_components):
  sd, _ = tiny_components
  token = baselines.token_id(sd.tokenizer, 'toy')
  vector = jnp.full((sd.text_encoder.config.hidden_size,), 3.0)
  swapped = baselines.with_token_embedding(sd.text_params, token, vector)
  before = np.asarray(sd.text_params['token_embedding']['embedding'])
  after = np.asarray(swapped['token_embedding']['embedding'])
  np.testing.assert_array_equal(after[token], np.full_like(after[token], 3.0))
  others = np.arange(before.shape[0]) != token
  np.testing.assert_array_equal(after[others], before[others])
  ids = encoders.tokenize(sd.tokenizer, ['a toy'])
  position = int(np.flatnonzero(np.asarray(ids[0]) == token)[0])
  old = np.asarray(encoders.encode_text(sd.text_encoder, sd.text_params, ids))
  new = np.asarray(encoders.encode_text(sd.text_encoder, swapped, ids))
  np.testing.assert_allclose(new[0, :position], old[0, :position], atol=1e-6)  # causal
  assert np.abs(new[0, position] - old[0, position]).max() > 1e-3
