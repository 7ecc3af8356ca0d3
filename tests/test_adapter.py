"""The RealCustom model wrapper and the frozen/trainable parameter partition."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from realcustom_jax import adapter
from realcustom_jax.loading import tiny
from realcustom_jax.model import RealCustom, param_shapes, validate_inputs, word_maps
from realcustom_jax.unet import RealCustomUNet
from tests.unet_configs import SD1_LIKE, SD2_LIKE

NT, NI, CI = 7, 5, 24


def _model(cfg, hidden=0):
  return RealCustom(RealCustomUNet.from_config(cfg), scoring_hidden=hidden)


@pytest.fixture(scope='module', params=[SD1_LIKE, SD2_LIKE], ids=['sd1', 'sd2'])
def built(request):
  model = _model(request.param, hidden=request.param['cross_attention_dim'] // 2)
  # Host-drawn weights of the traced shapes: a jitted init costs ~40 s of compile here.
  params = tiny.host_random_params(param_shapes(model, (4, 8, 8), NT, NI, CI), seed=0)
  return request.param, model, params


def _expected_adapter_size(unet, image_dim: int, latent_channels: int, text_dim: int,
                          scoring_hidden: int = 0, scoring: str = 'adaptive') -> int:
  """The adapter's parameter count from the paper's description (an independent count).

  Per attn2: W_Ki and W_Vi, each text_dim x inner (inner = the block's channels).
  Scoring: W_a^t (c_t), W_a^v (c), two MLPs [c_i + ctx] -> hidden -> 1 with biases
  (none with scoring='none').
  Projection: c_i x c_t + bias, LayerNorm scale + bias.
  """
  hidden = scoring_hidden or image_dim
  channels = tuple(unet.block_out_channels)
  n = len(channels)
  depth = unet._per_block(unet.transformer_layers_per_block)
  kv = 0
  for i, t in enumerate(unet.down_block_types):
    if t.startswith('CrossAttn'):
      kv += unet.layers_per_block * depth[i] * 2 * text_dim * channels[i]
  for i, t in enumerate(unet.up_block_types):
    if t.startswith('CrossAttn'):
      kv += (unet.layers_per_block + 1) * depth[n - 1 - i] * 2 * text_dim * channels[n - 1 - i]
  kv += depth[-1] * 2 * text_dim * channels[-1]
  mlp = lambda ctx: (image_dim + ctx) * hidden + hidden + hidden + 1
  score_nets = text_dim + latent_channels + mlp(text_dim) + mlp(latent_channels)
  proj = image_dim * text_dim + text_dim + 2 * text_dim
  return kv + (score_nets if scoring == 'adaptive' else 0) + proj


def test_adapter_size_matches_formula(built):
  cfg, model, params = built
  _, trainable = adapter.split_params(params)
  expected = _expected_adapter_size(
      model.unet, image_dim=CI, latent_channels=4, text_dim=cfg['cross_attention_dim'],
      scoring_hidden=model.scoring_hidden)
  assert adapter.count_params(trainable) == expected


def test_adapter_size_without_scoring():
  model = RealCustom(RealCustomUNet.from_config(SD1_LIKE), scoring_mode='none')
  params = param_shapes(model, (4, 8, 8), NT, NI, CI)
  _, trainable = adapter.split_params(params)
  assert 'scoring' not in trainable
  assert adapter.count_params(trainable) == _expected_adapter_size(
      model.unet, image_dim=CI, latent_channels=4, text_dim=SD1_LIKE['cross_attention_dim'],
      scoring='none')


@pytest.mark.parametrize('layout', [None, 1, '1', 3, 'x'])
def test_other_adapter_layouts_are_refused_by_name(layout):
  with pytest.raises(ValueError, match='layout') as e:
    adapter.check_layout(layout, 'adapter.safetensors')
  assert '\n' not in str(e.value) and 'adapter.safetensors' in str(e.value)
  adapter.check_layout(adapter.ADAPTER_LAYOUT, 'x')
  adapter.check_layout(str(adapter.ADAPTER_LAYOUT), 'x')


def test_split_and_merge_round_trip(built):
  _, _, params = built
  base, trainable = adapter.split_params(params)
  assert set(trainable) >= {'scoring', 'visual_proj', 'unet'}
  base_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(base)]
  assert not any('visual' in p or 'scoring' in p for p in base_paths)
  chex.assert_trees_all_equal(adapter.merge_params(base, trainable), params)
  assert (adapter.count_params(base) + adapter.count_params(trainable)
          == adapter.count_params(params))


def test_masked_optimizer_keeps_no_state_for_frozen_params(built):
  _, _, params = built
  mask = jax.tree_util.tree_map_with_path(
      lambda path, _: adapter.is_adapter_path(tuple(k.key for k in path)), params)
  opt = optax.masked(optax.adamw(1e-4, weight_decay=0.01), mask)
  state = opt.init(params)
  n_state = sum(x.size for x in jax.tree_util.tree_leaves(state)
                if hasattr(x, 'size') and x.ndim > 0)
  _, trainable = adapter.split_params(params)
  assert n_state == 2 * adapter.count_params(trainable)  # Adam's mu and nu only


def test_visual_kv_starts_as_copy_of_text_kv(built):
  _, _, params = built
  copied = adapter.init_visual_kv_from_text(params)
  attn2 = copied['unet']['down_blocks_0']['attentions_0']['transformer_blocks_0']['attn2']
  np.testing.assert_array_equal(attn2['to_k_visual']['kernel'], attn2['to_k']['kernel'])
  np.testing.assert_array_equal(attn2['to_v_visual']['kernel'], attn2['to_v']['kernel'])
  # Nothing else changed.
  chex.assert_trees_all_equal(adapter.split_params(copied)[0], adapter.split_params(params)[0])


def test_zero_v_start_leaves_the_base_prediction_untouched(built):
  """'zero_v' (the default start): to_k_visual copied, to_v_visual zero, so the subject
  changes nothing at step 0; the copied start changes the prediction."""
  cfg, model, params = built
  zero = adapter.init_visual_kv(params, 'zero_v')
  attn2 = zero['unet']['down_blocks_0']['attentions_0']['transformer_blocks_0']['attn2']
  np.testing.assert_array_equal(attn2['to_k_visual']['kernel'], attn2['to_k']['kernel'])
  assert not np.any(np.asarray(attn2['to_v_visual']['kernel']))
  z, t, text, image = _features(cfg)
  run = lambda p, img: model.apply({'params': p}, z, t, text, img,
                                   sqrt_alpha_bar=jnp.array([0.1, 0.9]), gamma_num=0.8)
  base = model.apply({'params': zero}, z, t, text)
  chex.assert_trees_all_close(run(zero, image), base, atol=1e-6)
  copied = adapter.init_visual_kv(params, 'copy_text')
  assert float(jnp.max(jnp.abs(run(copied, image) - base))) > 1e-3
  with pytest.raises(ValueError, match='visual_kv_init must be one of'):
    adapter.init_visual_kv(params, 'random')


def _features(cfg, seed=1):
  k = jax.random.split(jax.random.PRNGKey(seed), 4)
  return (jax.random.normal(k[0], (2, 4, 8, 8)), jnp.array([3, 900]),
          jax.random.normal(k[1], (2, NT, cfg['cross_attention_dim'])),
          jax.random.normal(k[2], (2, NI, CI)))


def test_dropped_image_gives_the_text_only_prediction(built):
  cfg, model, params = built
  z, t, text, image = _features(cfg)
  fn = jax.jit(lambda keep: model.apply({'params': params}, z, t, text, image,
                                        sqrt_alpha_bar=jnp.array([0.1, 0.9]),
                                        gamma_num=0.8, image_keep=keep))
  text_only = model.apply({'params': params}, z, t, text)
  dropped = fn(jnp.array([False, True]))
  # Different XLA programs (jit vs. eager) may round differently, hence the atol.
  np.testing.assert_allclose(np.asarray(dropped[0]), np.asarray(text_only[0]), atol=1e-5)
  assert np.abs(np.asarray(dropped[1] - text_only[1])).max() > 1e-5


def test_word_maps_needs_weights_and_returns_maps(built):
  cfg, model, params = built
  z, t, text, _ = _features(cfg)
  with pytest.raises(ValueError, match='word_weights'):
    word_maps(model, params, z, t, text)
  eps, maps = word_maps(model, params, z, t, text, word_weights=jnp.ones((2, NT)))
  chex.assert_shape(eps, z.shape)
  assert len(maps) == model.unet.num_cross_attention_layers


@pytest.mark.parametrize('kwargs, message', [
    (dict(text_features=np.zeros((1, NT, 5))), 'text features'),
    (dict(image_features=np.zeros((3, NI, CI))), 'image features'),
    (dict(word_weights=np.zeros((1, NT + 2))), 'token indices out of range'),
])
def test_bad_inputs_are_refused_before_tracing(kwargs, message):
  model = _model(SD1_LIKE)
  args = dict(text_features=np.zeros((1, NT, 32)))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    validate_inputs(model, **args)
