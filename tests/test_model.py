"""The adapter as a learning part: every trainable leaf reaches the loss (Eqs. 1, 9, 10).

Shape tests passed while Eq. 9's modulation was erased by the visual projection's
LayerNorm (score-net gradient 2e-7 of the rest). These tests run the real tiny model at
init, and the real train step on the toy shapes, and fail on such a disconnection.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny as tiny_config
from realcustom_jax import adapter as adapter_lib
from realcustom_jax import model as model_lib
from realcustom_jax import adapter_training as training
from train import synthetic_data as toy_data

B = 4


def _config(**model):
  c = tiny_config.get_config()
  c.model.update(model)
  return c


@pytest.fixture(scope='module')
def components(tiny_components):
  return tiny_components


def _setup(components, visual_kv_init='copy_text', **model):
  # The wiring tests start the visual V from the text V: with the default zero start
  # (`adapter.VISUAL_KV_INITS`) the visual branch outputs exactly zero at step 0, so the
  # score nets and the projection get no gradient until to_v_visual has moved (by design,
  # tested in test_zero_v_start_* below).
  sd, vision = components
  c = _config(**model)
  models, step_config = training.build_models(c, sd, vision)
  shapes = training.feature_shapes(sd, vision, c.resolution)
  adapter = training.init_adapter(models.model, sd.unet_params, jax.random.PRNGKey(0), shapes,
                                  visual_kv_init)
  k = jax.random.split(jax.random.PRNGKey(1), 4)
  t = jnp.array([50, 300, 600, 950])
  inputs = dict(
      latents=jax.random.normal(k[0], (B,) + tuple(shapes['latents'])),
      text=jax.random.normal(k[1], (B,) + tuple(shapes['text'])),
      image=jax.random.normal(k[2], (B,) + tuple(shapes['image'])),
      noise=jax.random.normal(k[3], (B,) + tuple(shapes['latents'])), t=t,
      sqrt_ab=jnp.sqrt(jnp.asarray(step_config.alphas_cumprod)[t]))
  return c, models, step_config, adapter, inputs


@pytest.fixture(scope='module')
def adaptive(components):
  return _setup(components)


def _predict(models, unet_params, adapter, x, gamma_num=1.0):
  return models.model.apply(
      {'params': adapter_lib.merge_params({'unet': unet_params}, adapter)},
      x['latents'], x['t'], x['text'], x['image'], sqrt_alpha_bar=x['sqrt_ab'],
      gamma_num=gamma_num)


def _grads(models, unet_params, adapter, x):
  loss = lambda a: jnp.mean((_predict(models, unet_params, a, x, 0.8) - x['noise']) ** 2)
  return jax.jit(jax.grad(loss))(adapter)


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in jax.tree.leaves(tree))))


def test_score_nets_get_a_real_share_of_the_gradient(components, adaptive):
  _, models, _, adapter, x = adaptive
  grads = _grads(models, components[0].unet_params, adapter, x)
  rest = {k: v for k, v in grads.items() if k != 'scoring'}
  share = _norm(grads['scoring']) / _norm(rest)
  assert share >= 1e-3, share  # was 2e-7 with Eq. 9 before the LayerNorm


def test_every_adapter_leaf_gets_gradient(components, adaptive):
  """A generic guard: a trainable leaf cut off from the loss fails here by name."""
  _, models, _, adapter, x = adaptive
  grads = _grads(models, components[0].unet_params, adapter, x)
  dead = [jax.tree_util.keystr(p) for p, g in jax.tree_util.tree_leaves_with_path(grads)
          if not np.any(np.asarray(g) != 0)]
  assert not dead, dead
  assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(adapter))


def test_changing_the_score_nets_changes_the_noise_prediction(components, adaptive):
  # gamma_num = 1 keeps every token, so only Eq. 9 (not the top-k) can carry the change.
  _, models, _, adapter, x = adaptive
  unet_params = components[0].unet_params
  before = np.asarray(_predict(models, unet_params, adapter, x))
  moved = dict(adapter, scoring=jax.tree.map(lambda p: 10 * p + 1, adapter['scoring']))
  after = np.asarray(_predict(models, unet_params, moved, x))
  assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()


def test_zero_v_start_leaves_the_base_untouched_and_trains_to_v_first(components):
  """'zero_v' (the default): step 0 predicts exactly what the frozen base predicts without
  a subject, and the gradient reaches to_v_visual, the one leaf that opens the branch."""
  _, models, _, adapter, x = _setup(components, visual_kv_init='zero_v')
  unet_params = components[0].unet_params
  with_subject = np.asarray(_predict(models, unet_params, adapter, x))
  without = np.asarray(models.model.apply(
      {'params': adapter_lib.merge_params({'unet': unet_params}, adapter)},
      x['latents'], x['t'], x['text'], None, sqrt_alpha_bar=x['sqrt_ab']))
  np.testing.assert_allclose(with_subject, without, atol=1e-6)
  grads = _grads(models, unet_params, adapter, x)
  to_v = [g for p, g in jax.tree_util.tree_leaves_with_path(grads)
          if 'to_v_visual' in jax.tree_util.keystr(p)]
  assert to_v and all(np.abs(np.asarray(g)).max() > 0 for g in to_v)
  # Behind the zero V nothing is reachable yet: the scoring nets wait for to_v to move.
  assert _norm(grads['scoring']) == 0.0


def _toy_batch(tokenizer, step: int, resolution: int) -> dict:
  rng = np.random.default_rng(step)
  images, ids = [], []
  for _ in range(B):
    image, caption = toy_data._draw_sample(rng, resolution)  # pylint: disable=protected-access
    images.append(np.asarray(image, np.float32) / 127.5 - 1.0)
    ids.append(tokenizer(caption, padding='max_length', max_length=77,
                         truncation=True)['input_ids'])
  return {'image': jnp.asarray(np.stack(images)), 'input_ids': jnp.asarray(ids, jnp.int32)}


def test_a_few_dozen_steps_move_the_score_nets(components):
  # From the default zero start: the score nets must move once to_v_visual has opened.
  config, models, step_config, adapter, _ = _setup(components, visual_kv_init='zero_v')
  sd, vision = components
  optimizer = training.create_optimizer(config)
  state = training.create_train_state(adapter, optimizer, jax.random.PRNGKey(2))
  frozen = {'unet': sd.unet_params, 'vae': sd.vae_params, 'text': sd.text_params,
            'vision': vision.params}
  step = jax.jit(lambda s, b: training.train_step(
      s, frozen, b, models=models, step_config=step_config, optimizer=optimizer))
  for i in range(30):
    state, metrics = step(state, _toy_batch(sd.tokenizer, i, config.resolution))
    assert np.isfinite(float(metrics['loss']))
  start, end = adapter['scoring'], jax.device_get(state['params']['scoring'])
  relative = _norm(jax.tree.map(lambda a, b: a - b, end, start)) / _norm(start)
  assert relative > 1e-3, relative
  # Every score-net leaf moved, not just some.
  for path, a in jax.tree_util.tree_leaves_with_path(start):
    b = end
    for key in path:
      b = b[key.key]
    assert np.abs(np.asarray(b) - np.asarray(a)).max() > 0, jax.tree_util.keystr(path)


def test_scoring_none_uses_every_token_unscored(components):
  """Table 3 ID-2: no score nets in the tree, gamma_num ignored, all tokens attended."""
  config, models, _, adapter, x = _setup(components, scoring='none')
  unet_params = components[0].unet_params
  assert 'scoring' not in adapter and 'visual_proj' in adapter
  few = np.asarray(_predict(models, unet_params, adapter, x, gamma_num=0.3))
  every = np.asarray(_predict(models, unet_params, adapter, x, gamma_num=1.0))
  np.testing.assert_array_equal(few, every)
  # It is the UNet fed the projected tokens, all of them, unmodulated.
  params = adapter_lib.merge_params({'unet': unet_params}, adapter)
  tokens = model_lib.VisualProjection(models.model.unet.cross_attention_dim).apply(
      {'params': params['visual_proj']}, x['image'])
  direct = models.model.unet.apply(
      {'params': params['unet']}, x['latents'], x['t'], x['text'], visual_tokens=tokens,
      visual_token_mask=jnp.ones(tokens.shape[:2], bool))
  np.testing.assert_allclose(every, np.asarray(direct), atol=1e-6)
  # ... and it still learns: the projection and the visual K/V get gradient.
  grads = _grads(models, unet_params, adapter, x)
  assert _norm(grads['visual_proj']) > 0 and _norm(grads['unet']) > 0
  chex.assert_trees_all_equal_structs(grads, adapter)


def test_bad_scoring_value_is_refused():
  with pytest.raises(ValueError, match='config.model.scoring'):
    model_lib.check_model_config(_config(scoring='topk').model)
  with pytest.raises(ValueError, match='config.model.numerics'):
    model_lib.check_model_config(_config(numerics='tf').model)


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction', 'sample', 'flow'])
def test_training_takes_every_prediction_type_the_sampler_takes(components, prediction_type):
  import dataclasses  # pylint: disable=g-import-not-at-top
  sd, vision = components
  sd = dataclasses.replace(sd, scheduler_config=dict(sd.scheduler_config,
                                                     prediction_type=prediction_type))
  if prediction_type == 'flow':
    with pytest.raises(training.ConfigError, match='prediction_type'):
      training.build_models(_config(), sd, vision)
    return
  _, step_config = training.build_models(_config(), sd, vision)
  assert step_config.prediction_type == prediction_type


def test_sdxl_added_conditioning_reaches_the_unet_in_every_branch():
  """The model hands SDXL's added conditioning to the UNet with and without the subject
  (the UNet refuses a call without it), and the parameter init builds it. Traced only:
  the release parity (test_release_model.py) checks the values."""
  from realcustom_jax.unet import RealCustomUNet  # pylint: disable=g-import-not-at-top
  from tests.unet_configs import SDXL_LIKE, SDXL_POOLED_DIM  # pylint: disable=g-import-not-at-top
  model = model_lib.RealCustom(RealCustomUNet.from_config(SDXL_LIKE))
  assert model_lib.added_cond_shapes(model.unet) == {'text_embeds': (SDXL_POOLED_DIM,),
                                                     'time_ids': (6,)}
  params = model_lib.param_shapes(model, (4, 8, 8), 5, 3, 24)
  x, t, text = jnp.zeros((2, 4, 8, 8)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, 5, 32))
  cond = {'text_embeds': jnp.zeros((2, SDXL_POOLED_DIM)), 'time_ids': jnp.zeros((2, 6))}
  for image in (None, jnp.zeros((2, 3, 24))):
    call = lambda p, c, image=image: model.apply(
        {'params': p}, x, t, text, image, sqrt_alpha_bar=jnp.ones((2,)), added_cond=c)
    assert jax.eval_shape(call, params, cond).shape == x.shape
    with pytest.raises(ValueError, match='added_cond'):
      jax.eval_shape(call, params, None)


def test_straight_through_selection_gives_the_score_nets_more_gradient(components, adaptive):
  """With Eq. 9's gain off, the paper's score nets get no gradient at all (the top-k has
  none); the straight-through selection gives them one, through the visual attention,
  and changes nothing in the forward pass."""
  _, models, _, adapter, x = adaptive
  unet_params = components[0].unet_params
  no_gain = models.model.clone(scoring_gain=False)

  def grads(straight_through):
    def loss(a):
      pred = no_gain.apply({'params': adapter_lib.merge_params({'unet': unet_params}, a)},
                           x['latents'], x['t'], x['text'], x['image'],
                           sqrt_alpha_bar=x['sqrt_ab'], gamma_num=0.5,
                           straight_through_selection=straight_through)
      return jnp.mean((pred - x['noise']) ** 2), pred
    return jax.jit(jax.grad(loss, has_aux=True))(adapter)

  paper, paper_pred = grads(False)
  st, st_pred = grads(True)
  assert _norm(paper['scoring']) == 0.0
  assert _norm(st['scoring']['text_score_net']) > 0 and _norm(st['scoring']['visual_score_net']) > 0
  chex.assert_trees_all_close(st_pred, paper_pred, atol=1e-5)
