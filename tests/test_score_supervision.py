"""config.train.score_supervision='word_map' (realcustom_jax/adapter_training.py): the
word-map targets, the loss, and the score nets learning from it."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny as tiny_config
from realcustom_jax import adapter as adapter_lib
from realcustom_jax import adapter_training as training

B = 4


def test_targets_average_each_tokens_block_and_normalise():
  word_map = np.zeros((2, 8, 8), np.float32)
  word_map[0, :4, :4] = 1.0  # top-left quarter: tokens (0, 0), (0, 1), (1, 0), (1, 1)
  word_map[0, 6:, 6:] = 2.0  # one token's block, twice as strong
  targets = np.asarray(training.token_grid_targets(jnp.asarray(word_map), 16))
  chex.assert_shape(targets, (2, 16))
  expected = np.zeros(16)
  expected[[0, 1, 4, 5]] = 4.0
  expected[15] = 8.0
  np.testing.assert_allclose(targets[0], expected / expected.sum(), atol=1e-7)
  np.testing.assert_allclose(targets[1], np.full(16, 1 / 16), atol=1e-7)  # no mass: uniform
  # Sizes that do not divide are resized, still one distribution per row.
  odd = np.asarray(training.token_grid_targets(jnp.asarray(word_map), 9))
  np.testing.assert_allclose(odd.sum(-1), 1.0, atol=1e-6)
  assert odd[0].argmax() in (0, 8)
  with pytest.raises(ValueError, match='square grid of patch tokens, got 12'):
    training.token_grid_targets(jnp.asarray(word_map), 12)


def _sown(word_maps, fused):
  """An 'intermediates' collection as the model sows it (each value a 1-tuple)."""
  return {'unet': {f'attn_{i}': {'word_map': (m,)} for i, m in enumerate(word_maps)},
          'scoring': {'selected_tokens': (fused > 0,), 'fused_scores': (fused,)}}


def test_loss_is_the_rows_cross_entropy_to_the_layer_mean_map():
  rng = np.random.default_rng(0)
  maps = [jnp.asarray(rng.random((3, 4, 4)), jnp.float32),
          jnp.asarray(rng.random((3, 2, 2)), jnp.float32)]  # resized to 4 x 4, averaged
  fused = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  rows = jnp.asarray([1.0, 0.0, 1.0])
  loss = training.score_supervision_loss(_sown(maps, fused), rows)
  upsampled = jax.image.resize(maps[1], (3, 4, 4), 'bilinear')
  mean_map = (np.asarray(maps[0]) + np.asarray(upsampled)) / 2
  blocks = mean_map.reshape(3, 2, 2, 2, 2).mean(axis=(2, 4)).reshape(3, 4)
  target = blocks / blocks.sum(-1, keepdims=True)
  log_s = np.asarray(jax.nn.log_softmax(fused, -1))
  per_row = -(target * log_s).sum(-1)
  np.testing.assert_allclose(float(loss), (per_row[0] + per_row[2]) / 2, rtol=1e-5)
  assert float(training.score_supervision_loss(_sown(maps, fused), jnp.zeros(3))) == 0.0
  # The target carries no gradient: d loss / d fused = (softmax - target) per counted row.
  grad = jax.grad(lambda f: training.score_supervision_loss(_sown(maps, f), rows))(fused)
  expected = (np.asarray(jax.nn.softmax(fused, -1)) - target) * np.asarray(rows)[:, None] / 2
  np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-6)
  with pytest.raises(ValueError, match='needs the word maps and one scoring module'):
    training.score_supervision_loss({'scoring': {'fused_scores': (fused,)}}, rows)


@pytest.fixture(scope='module')
def supervised(tiny_components):
  sd, vision = tiny_components
  config = tiny_config.get_config()
  config.train.score_supervision = 'word_map'
  config.train.subject_words = ('toy',)
  models, step_config = training.build_models(config, sd, vision)
  shapes = training.feature_shapes(sd, vision, config.resolution)
  adapter = training.init_adapter(models.model, sd.unet_params, jax.random.PRNGKey(0),
                                  shapes, 'copy_text')
  k = jax.random.split(jax.random.PRNGKey(1), 3)
  inputs = dict(latents=jax.random.normal(k[0], (B,) + tuple(shapes['latents'])),
                text=jax.random.normal(k[1], (B,) + tuple(shapes['text'])),
                image=jax.random.normal(k[2], (B,) + tuple(shapes['image'])),
                subject_words=jnp.zeros((B, shapes['text'][0])).at[:, 2].set(1.0))
  return sd, models, step_config, adapter, inputs


def test_subject_words_become_token_ids_and_a_split_word_is_refused(supervised,
                                                                   tiny_components):
  sd, _, step_config, _, _ = supervised
  assert step_config.score_supervision == 'word_map'
  assert step_config.subject_word_ids == tuple(
      sd.tokenizer('toy', add_special_tokens=False).input_ids)
  split = next(w for w in ('teddybear', 'photographically', 'xqzv')
               if len(sd.tokenizer(w, add_special_tokens=False).input_ids) > 1)
  config = tiny_config.get_config()
  config.train.score_supervision = 'word_map'
  config.train.subject_words = ('toy', split)
  with pytest.raises(training.ConfigError, match=f"{split!r} is .* tokens for this tokenizer"):
    training.build_models(config, *tiny_components)


def test_the_score_loss_reaches_the_score_nets_only_and_a_few_steps_lower_it(supervised):
  """A learning part: the loss's gradient reaches every score-net leaf and nothing else
  (the target has none), and 15 Adam steps on the score nets lower it."""
  sd, models, step_config, adapter, x = supervised
  t = jnp.array([50, 300, 600, 950])
  sqrt_ab = jnp.sqrt(jnp.asarray(step_config.alphas_cumprod)[t])

  def score_loss(a):
    _, sown = models.model.apply(
        {'params': adapter_lib.merge_params({'unet': sd.unet_params}, a)}, x['latents'], t,
        x['text'], x['image'], sqrt_alpha_bar=sqrt_ab, gamma_num=0.8,
        word_weights=x['subject_words'], mutable=['intermediates'])
    return training.score_supervision_loss(sown['intermediates'], jnp.ones(B))

  grads = jax.jit(jax.grad(score_loss))(adapter)
  norms = {k: float(optax.global_norm(v)) for k, v in grads.items()}
  assert norms.pop('scoring') > 0 and all(v == 0 for v in norms.values()), norms
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads['scoring']):
    if 'text_pool' not in jax.tree_util.keystr(path):  # Eq. 5 pools fixed random text
      assert np.any(np.asarray(leaf) != 0), jax.tree_util.keystr(path)

  optimizer = optax.adam(1e-2)
  scoring, opt_state = adapter['scoring'], optax.adam(1e-2).init(adapter['scoring'])

  @jax.jit
  def step(scoring, opt_state):
    loss, g = jax.value_and_grad(lambda s: score_loss(dict(adapter, scoring=s)))(scoring)
    updates, opt_state = optimizer.update(g, opt_state)
    return optax.apply_updates(scoring, updates), opt_state, loss

  losses = []
  for _ in range(15):
    scoring, opt_state, loss = step(scoring, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05, losses


def test_the_train_step_reports_both_losses_and_needs_the_subject_words(supervised):
  sd, models, step_config, adapter, x = supervised
  optimizer = optax.adam(1e-3)
  state = {'step': jnp.array(0), 'params': adapter, 'opt_state': optimizer.init(adapter),
           'rng': jax.random.PRNGKey(3)}
  _, metrics = training.adapter_step(
      state, sd.unet_params, x['latents'], x['text'], x['image'], jax.random.PRNGKey(5),
      models=models, step_config=step_config, optimizer=optimizer,
      subject_words=x['subject_words'])
  np.testing.assert_allclose(
      float(metrics['loss']),
      float(metrics['diffusion_loss'])
      + step_config.score_supervision_weight * float(metrics['score_loss']), rtol=1e-5)
  assert float(metrics['score_loss']) > 0
  with pytest.raises(ValueError, match="needs the captions' subject words"):
    training.adapter_step(state, sd.unet_params, x['latents'], x['text'], x['image'],
                          jax.random.PRNGKey(5), models=models, step_config=step_config,
                          optimizer=optimizer)
