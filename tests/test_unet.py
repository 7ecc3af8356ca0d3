"""Our UNet against diffusers' Flax and torch UNets, and its visual branch."""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxUNet2DConditionModel
from flax import traverse_util

from realcustom_jax import kernels
from realcustom_jax.loading import tiny
from realcustom_jax import unet as unet_lib
from realcustom_jax.loading import formats
from realcustom_jax.unet import RealCustomUNet
from tests.unet_configs import SD1_LIKE, SD2_LIKE, SDXL_BASE, SDXL_LIKE, SDXL_POOLED_DIM

N_TEXT, N_IMAGE = 7, 5


def _inputs(cfg, batch=2, seed=1):
  k = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(k[0], (batch, 4, 8, 8))
  t = jnp.array([10, 700][:batch])
  ctx = jax.random.normal(k[1], (batch, N_TEXT, cfg['cross_attention_dim']))
  vis = jax.random.normal(k[2], (batch, N_IMAGE, cfg['cross_attention_dim']))
  return x, t, ctx, vis


@pytest.fixture(scope='module', params=[SD1_LIKE, SD2_LIKE], ids=['sd1', 'sd2'])
def setup(request):
  cfg = request.param
  ref = FlaxUNet2DConditionModel(**cfg)
  # Weights drawn on the host from the traced shapes: running diffusers' init (eagerly,
  # op by op) and ours (one big compile) cost a minute per config on 2 cores.
  ref_params = tiny.host_random_params(
      jax.eval_shape(ref.init_weights, jax.random.PRNGKey(0)), seed=0)
  ours = RealCustomUNet.from_config(cfg)
  x, t, ctx, vis = _inputs(cfg)
  full = tiny.host_random_params(jax.eval_shape(
      ours.init, jax.random.PRNGKey(3), x, t, ctx, visual_tokens=vis)['params'], seed=3)
  return cfg, ref, ref_params, ours, full


def _set_visual_kv(params, fn):
  def visit(path, leaf):
    names = [getattr(p, 'key', '') for p in path]
    return fn(leaf) if any(n in ('to_k_visual', 'to_v_visual') for n in names) else leaf
  return jax.tree_util.tree_map_with_path(visit, params)


def test_parameter_tree_matches_diffusers(setup):
  cfg, _, ref_params, ours, full = setup
  x, t, ctx, _ = _inputs(cfg)
  text_only = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x, t, ctx)['params']
  assert (jax.tree_util.tree_structure(text_only)
          == jax.tree_util.tree_structure(ref_params))
  chex.assert_trees_all_equal_shapes(text_only, ref_params)
  # The visual branch adds exactly one K/V pair per attn2.
  n_kv = sum(1 for p, _ in jax.tree_util.tree_leaves_with_path(full)
             if 'to_k_visual' in jax.tree_util.keystr(p))
  assert n_kv == ours.num_cross_attention_layers > 0


def test_matches_diffusers_flax_with_visual_branch_off(setup):
  cfg, ref, ref_params, _, _ = setup
  ours = RealCustomUNet.from_config(cfg, numerics='diffusers_flax')
  x, t, ctx, _ = _inputs(cfg)
  expected = jax.jit(lambda p: ref.apply({'params': p}, x, t, ctx).sample)(ref_params)
  got = jax.jit(lambda p: ours.apply({'params': p}, x, t, ctx))(ref_params)
  chex.assert_shape(got, x.shape)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=0)


@pytest.mark.parametrize('cfg', [SD1_LIKE, SD2_LIKE], ids=['sd1', 'sd2'])
def test_matches_diffusers_torch_unet_with_torch_numerics(cfg, tmp_path):
  """SD checkpoints come from torch: the default numerics reproduce its UNet.

  The weights travel the real way: torch's save_pretrained (safetensors), then our
  torch-free loader. diffusers' Flax numerics (tanh GELU, GroupNorm eps 1e-5) must be
  measurably further off, or this test could not tell the two apart.
  """
  torch = pytest.importorskip('torch')
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  ref = UNet2DConditionModel(**cfg).eval()
  # torch's default init leaves the output conv near zero; larger weights make the
  # comparison sensitive everywhere.
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  ref.save_pretrained(str(tmp_path), safe_serialization=True)
  params = formats.load_diffusers_params(
      FlaxUNet2DConditionModel.from_config(cfg), str(tmp_path), False, jnp.float32)
  x, t, ctx, _ = _inputs(cfg)
  with torch.no_grad():
    want = ref(*(torch.from_numpy(np.array(a)) for a in (x, t, ctx))).sample.numpy()
  run = lambda m: np.asarray(jax.jit(lambda p: m.apply({'params': p}, x, t, ctx))(params))
  torch_numerics = np.abs(run(RealCustomUNet.from_config(cfg)) - want).max()
  flax_numerics = np.abs(
      run(RealCustomUNet.from_config(cfg, numerics='diffusers_flax')) - want).max()
  print(f'torch parity {cfg["cross_attention_dim"]}: torch numerics {torch_numerics:.2e}, '
        f'diffusers-flax numerics {flax_numerics:.2e}, output max {np.abs(want).max():.2f}')
  assert np.abs(want).max() > 0.1  # a real signal, not a near-zero output
  assert torch_numerics <= 5e-6, torch_numerics
  assert flax_numerics > 4 * torch_numerics and flax_numerics > 5e-6, flax_numerics


def _run(ours, params, cfg, **kw):
  x, t, ctx, vis = _inputs(cfg)
  fn = jax.jit(lambda p, kw: ours.apply({'params': p}, x, t, ctx, **kw))
  return np.asarray(fn(params, kw)), vis


def test_zero_visual_kv_gives_text_only_output(setup):
  cfg, _, _, ours, full = setup
  text_only, vis = _run(ours, full, cfg)
  zero_kv = _set_visual_kv(full, jnp.zeros_like)
  with_vis, _ = _run(ours, zero_kv, cfg, visual_tokens=vis)
  np.testing.assert_array_equal(with_vis, text_only)
  # ... while random visual K/V do change the prediction.
  changed, _ = _run(ours, full, cfg, visual_tokens=vis)
  assert np.abs(changed - text_only).max() > 1e-4


def test_all_zero_scope_or_no_selected_token_gives_text_only_output(setup):
  cfg, _, _, ours, full = setup
  text_only, vis = _run(ours, full, cfg)
  zero_scope, _ = _run(ours, full, cfg, visual_tokens=vis, scope_mask=jnp.zeros((2, 8, 8)))
  np.testing.assert_array_equal(zero_scope, text_only)
  none_selected, _ = _run(ours, full, cfg, visual_tokens=vis,
                          visual_token_mask=jnp.zeros((2, N_IMAGE), bool))
  np.testing.assert_array_equal(none_selected, text_only)


def test_scope_gates_only_where_it_is_nonzero(setup):
  """A half scope changes the output less than a full one, and both differ from none."""
  cfg, _, _, ours, full = setup
  text_only, vis = _run(ours, full, cfg)
  full_scope, _ = _run(ours, full, cfg, visual_tokens=vis, scope_mask=jnp.ones((2, 8, 8)))
  no_scope, _ = _run(ours, full, cfg, visual_tokens=vis)
  np.testing.assert_allclose(full_scope, no_scope, atol=1e-5)


def test_word_maps_are_sown_per_cross_attention_layer(setup):
  cfg, _, _, ours, full = setup
  x, t, ctx, _ = _inputs(cfg)
  weights = jnp.ones((2, N_TEXT))  # every token: the maps must sum to 1 everywhere
  _, state = jax.jit(lambda p: ours.apply({'params': p}, x, t, ctx, word_weights=weights,
                                          mutable=['intermediates']))(full)
  maps = jax.tree_util.tree_leaves(state['intermediates'])
  assert len(maps) == ours.num_cross_attention_layers
  assert max(m.shape[1:] for m in maps) == ours.word_map_size(8, 8)
  # A config whose first block has no cross-attention: the largest map is 4 x 4.
  no_first = RealCustomUNet.from_config(
      {**cfg, 'down_block_types': ('DownBlock2D',) + tuple(cfg['down_block_types'][1:]),
       'up_block_types': tuple(cfg['up_block_types'][:-1]) + ('UpBlock2D',)})
  assert no_first.word_map_size(8, 8) == (4, 4) and no_first.word_map_size(9, 7) == (5, 4)
  sizes = {m.shape[1:] for m in maps}
  assert (8, 8) in sizes
  for m in maps:
    np.testing.assert_allclose(np.asarray(m), 1.0, atol=1e-5)
  one_token = jnp.zeros((2, N_TEXT)).at[:, 2].set(1.0)
  _, state = jax.jit(lambda p: ours.apply({'params': p}, x, t, ctx, word_weights=one_token,
                                          mutable=['intermediates']))(full)
  for m in jax.tree_util.tree_leaves(state['intermediates']):
    assert 0.0 < float(m.min()) and float(m.max()) < 1.0


def test_remat_gives_the_same_output():
  cfg = SD1_LIKE
  x, t, ctx, vis = _inputs(cfg)
  plain = RealCustomUNet.from_config(cfg)
  params = tiny.host_random_params(jax.eval_shape(
      plain.init, jax.random.PRNGKey(0), x, t, ctx, visual_tokens=vis)['params'], seed=0)
  loss = lambda m: lambda p: jnp.sum(m.apply({'params': p}, x, t, ctx, visual_tokens=vis) ** 2)
  g1 = jax.jit(jax.grad(loss(plain)))(params)
  # 'dots' (the matmul outputs kept); 'full' is the same wrapper with no policy.
  remat = RealCustomUNet.from_config(cfg, remat='dots')
  jaxpr = str(jax.make_jaxpr(jax.grad(loss(remat)))(params))
  assert 'remat' in jaxpr or 'checkpoint' in jaxpr
  g2 = jax.jit(jax.grad(loss(remat)))(params)
  chex.assert_trees_all_close(g1, g2, atol=1e-5, rtol=1e-5)
  assert [unet_lib.remat_policy(r) for r in (True, False, 'none', 'full', 'dots')] == [
      'full', None, None, 'full', 'dots']


def test_fused_attention_call_matches_xla_in_value_and_gradient(cudnn_on_cpu):
  # The 'cudnn' path calls jax.nn.dot_product_attention (B, T, N, H layout). cuDNN needs
  # a GPU, so here the layer is told to take that path and JAX runs its own XLA kernel
  # behind the same call: a swapped axis or a wrong scale breaks the match.
  cfg = SD1_LIKE
  x, t, ctx, vis = _inputs(cfg)
  xla = RealCustomUNet.from_config(cfg)
  fused = RealCustomUNet.from_config(cfg, attention_impl='cudnn')
  params = tiny.host_random_params(jax.eval_shape(
      xla.init, jax.random.PRNGKey(0), x, t, ctx, visual_tokens=vis)['params'], seed=0)
  loss = lambda m: lambda p: jnp.sum(m.apply({'params': p}, x, t, ctx, visual_tokens=vis) ** 2)
  v1, g1 = jax.jit(jax.value_and_grad(loss(xla)))(params)
  v2, g2 = jax.jit(jax.value_and_grad(loss(fused)))(params)
  assert cudnn_on_cpu and {c[0] for c in cudnn_on_cpu} == {'cudnn'}
  np.testing.assert_allclose(v1, v2, rtol=1e-5)
  chex.assert_trees_all_close(g1, g2, atol=1e-4)


def _device(platform='gpu', kind='NVIDIA H100 80GB HBM3', cc='9.0'):
  return types.SimpleNamespace(platform=platform, device_kind=kind, compute_capability=cc)


@pytest.mark.parametrize('requested, head_dim, device, want', [
    ('auto', 160, _device(), 'cudnn'),  # Hopper: widths up to 256
    ('auto', 160, _device(kind='NVIDIA A100-SXM4-80GB', cc='8.0'), 'xla'),  # > 128
    ('auto', 80, _device(kind='NVIDIA A100-SXM4-80GB', cc='8.0'), 'cudnn'),
    ('auto', 36, _device(), 'xla'),  # not a multiple of 8
    ('auto', 64, _device(kind='Tesla T4', cc='7.5'), 'xla'),  # before Ampere
    ('auto', 64, _device(platform='cpu', kind='cpu', cc=None), 'xla'),
    ('auto', 64, _device(platform='tpu', kind='TPU v5 lite', cc=None), 'xla'),
    ('xla', 64, _device(), 'xla'),
    ('cudnn', 160, _device(kind='NVIDIA A100-SXM4-80GB', cc='8.0'), 'cudnn'),  # as asked
])
def test_auto_picks_cudnn_only_where_it_accepts_the_head_width(requested, head_dim, device,
                                                              want):
  assert kernels.layer_attention_impl(requested, head_dim, device=device) == want


@pytest.mark.parametrize('setting, message', [
    (dict(numerics='jax'), 'numerics'), (dict(remat='sometimes'), "remat must be .*'dots'")])
def test_unknown_numerics_or_remat_is_refused(setting, message):
  cfg = SD1_LIKE
  x, t, ctx, _ = _inputs(cfg)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(RealCustomUNet.from_config(cfg, **setting).init,
                   jax.random.PRNGKey(0), x, t, ctx)


@pytest.mark.parametrize('bad, message', [
    (dict(addition_embed_type='text'), 'addition_embed_type'),
    (dict(addition_embed_type='text_time'), 'addition_time_embed_dim'),
    (dict(class_embed_type='timestep'), 'class_embed_type'),
    (dict(resnet_time_scale_shift='scale_shift'), 'resnet_time_scale_shift'),
    (dict(num_attention_heads=(2, 4)), 'num_attention_heads'),
    (dict(transformer_layers_per_block=((1, 2), (1, 1))), 'per-layer'),
    (dict(reverse_transformer_layers_per_block=((1, 1), (1, 1))),
     'reverse_transformer_layers_per_block'),
    (dict(down_block_types=('CrossAttnDownBlock2D', 'AttnDownBlock2D')), 'AttnDownBlock2D'),
    (dict(mid_block_type='UNetMidBlock2DSimpleCrossAttn'), 'mid_block_type'),
])
def test_unsupported_configs_are_refused(bad, message):
  with pytest.raises(ValueError, match=message):
    RealCustomUNet.from_config({**SD1_LIKE, **bad})


# ---------------------------------------------------------------------------------
# SDXL: added 'text_time' conditioning and per-block transformer depth
# ---------------------------------------------------------------------------------


def _sdxl_cond(seed=4):
  """Pooled text embeddings and size/crop time ids, distinct per sample (NumPy: no
  eager JAX op to compile)."""
  text_embeds = np.random.default_rng(seed).standard_normal((2, SDXL_POOLED_DIM))
  time_ids = np.array([[1024, 768, 0, 0, 1024, 768], [512, 640, 16, 32, 768, 1024]])
  return dict(text_embeds=text_embeds.astype(np.float32), time_ids=time_ids.astype(np.float32))


def test_sdxl_parameter_tree_matches_diffusers():
  cfg = SDXL_LIKE
  x, t, ctx, vis = _inputs(cfg)
  ours = RealCustomUNet.from_config(cfg)
  ref = jax.eval_shape(FlaxUNet2DConditionModel(**cfg).init_weights, jax.random.PRNGKey(0))
  full = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x, t, ctx, visual_tokens=vis,
                        added_cond=_sdxl_cond())['params']
  flat = traverse_util.flatten_dict(full)
  visual = {k for k in flat if k[-2] in ('to_k_visual', 'to_v_visual')}
  text_only = traverse_util.unflatten_dict({k: v for k, v in flat.items() if k not in visual})
  assert jax.tree_util.tree_structure(text_only) == jax.tree_util.tree_structure(ref)
  chex.assert_trees_all_equal_shapes(text_only, ref)
  assert text_only['add_embedding']['linear_1']['kernel'].shape == (20 + 6 * 8, 4 * 32)
  # Depth 1 / 2 at the two attention levels, mirrored in the up blocks, 2 in the mid
  # block, one attn2 (one visual K/V pair) per transformer block: 1 + 2 (down) +
  # 2 * 2 + 2 * 1 (up) + 2 (mid).
  up_0 = text_only['up_blocks_0']['attentions_0']
  assert sorted(k for k in up_0 if k.startswith('transformer_blocks')) == [
      'transformer_blocks_0', 'transformer_blocks_1']
  assert len(visual) // 2 == ours.num_cross_attention_layers == 11
  assert ours.word_map_size(8, 8) == (4, 4)  # the first level has no cross-attention


def test_sdxl_base_config_builds_with_the_release_layer_count():
  """The real SDXL config is accepted as written; 70 attn2 layers, as the release counts."""
  unet = RealCustomUNet.from_config(SDXL_BASE)
  assert unet.transformer_layers_per_block == (1, 2, 10)
  assert unet.has_added_cond and unet.addition_time_embed_dim == 256
  # 2 x 2 + 2 x 10 (down) + 10 (mid) + 3 x 10 + 3 x 2 (up). The release numbers its
  # transformer blocks with a `cross_attention_id` counter; its saved config holds 70.
  assert unet.num_cross_attention_layers == 70
  assert unet.word_map_size(128, 96) == (64, 48)  # 1024 x 768 px: no attention at 128 x 96


@pytest.fixture(scope='module')
def sdxl_torch(tmp_path_factory):
  """A random torch SDXL-shaped UNet, saved and read back through our loader."""
  torch = pytest.importorskip('torch')
  from diffusers import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  cfg = SDXL_LIKE
  torch.manual_seed(0)
  ref = UNet2DConditionModel(**cfg).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  folder = str(tmp_path_factory.mktemp('sdxl_unet'))
  ref.save_pretrained(folder, safe_serialization=True)
  params = formats.load_diffusers_params(
      FlaxUNet2DConditionModel.from_config(cfg), folder, False, jnp.float32)
  ours = RealCustomUNet.from_config(cfg)
  x, t, ctx, _ = _inputs(cfg)
  run = jax.jit(lambda p, cond: ours.apply({'params': p}, x, t, ctx, added_cond=cond))

  def torch_run(cond):
    as_torch = lambda a: torch.from_numpy(np.array(a))
    with torch.no_grad():
      return ref(as_torch(x), as_torch(t), as_torch(ctx),
                 added_cond_kwargs={k: as_torch(v) for k, v in cond.items()}).sample.numpy()

  return params, lambda cond: np.asarray(run(params, cond)), torch_run


def test_sdxl_matches_diffusers_torch_unet(sdxl_torch):
  """SDXL weights travel as real ones do: torch safetensors, our torch-free loader."""
  _, ours, torch_run = sdxl_torch
  cond = _sdxl_cond()
  want = torch_run(cond)
  diff = np.abs(ours(cond) - want).max()
  print(f'SDXL torch parity: {diff:.2e}, output max {np.abs(want).max():.2f}')
  assert np.abs(want).max() > 0.1
  assert diff <= 5e-6, diff


def test_sdxl_added_conditioning_changes_the_output(sdxl_torch):
  _, ours, torch_run = sdxl_torch
  cond = _sdxl_cond()
  base = ours(cond)
  other_size = dict(cond, time_ids=cond['time_ids'] + np.array([256, 0, 0, 0, 0, 0],
                                                               np.float32))
  other_text = dict(cond, text_embeds=-cond['text_embeds'])
  for changed in (other_size, other_text):
    got = ours(changed)
    assert np.abs(got - base).max() > 1e-3
    assert np.abs(got - torch_run(changed)).max() <= 5e-6  # ... and the change is right


def test_sdxl_bad_added_conditioning_is_refused():
  x, t, ctx, _ = _inputs(SDXL_LIKE)
  sdxl = RealCustomUNet.from_config(SDXL_LIKE)
  params = jax.eval_shape(sdxl.init, jax.random.PRNGKey(0), x, t, ctx,
                          added_cond=_sdxl_cond())['params']
  call = lambda model, p, **kw: jax.eval_shape(
      lambda p: model.apply({'params': p}, x, t, ctx, **kw), p)
  with pytest.raises(ValueError, match="addition_embed_type='text_time'.*text_embeds"):
    call(sdxl, params)
  with pytest.raises(ValueError, match="text_embeds.*time_ids"):
    call(sdxl, params, added_cond={'text_embeds': _sdxl_cond()['text_embeds']})
  with pytest.raises(ValueError, match=r'text_embeds \(2, 19\)'):
    call(sdxl, params, added_cond=dict(_sdxl_cond(), text_embeds=jnp.zeros((2, 19))))
  with pytest.raises(ValueError, match=r'time_ids \(6,\)'):  # unbatched
    call(sdxl, params, added_cond=dict(_sdxl_cond(), time_ids=jnp.zeros(6)))
  sd1 = RealCustomUNet.from_config(SD1_LIKE)
  sd1_params = jax.eval_shape(sd1.init, jax.random.PRNGKey(0), x, t, ctx)['params']
  with pytest.raises(ValueError, match='no added conditioning'):
    call(sd1, sd1_params, added_cond=_sdxl_cond())
