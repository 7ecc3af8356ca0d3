"""toy/encoder.py: the CLIP-like subject encoder as a learning part, its on-disk layout
and its gate, on the shipped toy base's text encoder (read through the real loaders)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import toy_world as toy_config
from realcustom_jax import encoders
from realcustom_jax.loading import weights
from toy import encoder as toy_encoder
from toy import reproduction
from toy import shipped
from toy import world as toy_world


@pytest.fixture(scope='module')
def base_dirs(tmp_path_factory):
  dest = str(tmp_path_factory.mktemp('shipped'))
  sd_dir, _, _ = shipped.materialise(dest)
  return sd_dir, os.path.join(dest, 'vision')  # the base's random tower


def _small_config():
  config = toy_config.get_config('smoke')
  config.toy.subject_encoder = 'contrastive'
  config.toy.encoder.vision = dict(config.toy.encoder.vision, hidden_size=16,
                                   intermediate_size=32, num_hidden_layers=2)
  config.toy.encoder.steps = 4
  config.toy.encoder.batch = 8
  config.toy.num_train_images = 32
  config.toy.probe_images = 32
  return config


def _reference_loss(image_emb, text_emb, logit_scale, ids):
  """CLIP's loss written out: each row's targets spread over the rows of its caption."""
  logits = np.exp(min(logit_scale, np.log(100.0))) * image_emb @ text_emb.T
  targets = (ids[:, None] == ids[None, :]).astype(np.float64)
  targets /= targets.sum(1, keepdims=True)
  def ce(z, t):
    z = z - z.max(1, keepdims=True)
    return -(t * (z - np.log(np.exp(z).sum(1, keepdims=True)))).sum(1).mean()
  return 0.5 * (ce(logits, targets) + ce(logits.T, targets.T))


def test_contrastive_loss_counts_every_row_of_a_caption_as_positive():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(2, 6, 4))
  img /= np.linalg.norm(img, axis=1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=1, keepdims=True)
  ids = np.array([0, 1, 1, 2, 0, 3])
  got = toy_encoder.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 1.5, jnp.asarray(ids))
  np.testing.assert_allclose(float(got), _reference_loss(img, txt, 1.5, ids), rtol=1e-5)
  # All-distinct captions: the plain CLIP loss, which a duplicate-blind version computes
  # for `ids` too; the two differ, so the duplicates are handled.
  distinct = toy_encoder.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), 1.5,
                                          jnp.arange(6))
  assert abs(float(distinct) - float(got)) > 1e-3


def test_encoder_learns_writes_the_transformers_layout_and_gates(base_dirs, tmp_path):
  sd_dir, random_vision_dir = base_dirs
  config = _small_config()
  components = weights.load_stable_diffusion(sd_dir)
  scenes = list(toy_world.iter_scenes(16, 16, 0))
  images = np.stack([toy_world.render(sc, 16)[0] for sc in scenes])
  named = [sc.named_caption for sc in scenes]
  ids = jnp.asarray([sorted(set(named)).index(c) for c in named])
  feats = jnp.asarray(toy_encoder.caption_features(
      components.text_encoder, components.text_params, components.tokenizer,
      sorted(set(named))))
  model = toy_encoder.build_model(config)
  pixels = jnp.asarray(toy_encoder.pixel_values(images, 16))
  params = toy_encoder.init_params(config, model, feats.shape[-1])

  def loss_fn(p):
    return toy_encoder.contrastive_loss(toy_encoder.embed_images(model, p, pixels),
                                        toy_encoder.embed_texts(p, feats[ids]),
                                        p['logit_scale'], ids)

  # Every leaf (tower, both projections, temperature) gets gradient.
  grads = jax.grad(loss_fn)(params)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)
  # A few steps on one batch lower the loss.
  opt = optax.adam(3e-3)
  state, p, before = opt.init(params), params, float(loss_fn(params))
  step = jax.jit(lambda p, s: (lambda g: (optax.apply_updates(p, opt.update(g, s, p)[0]),
                                           opt.update(g, s, p)[1]))(jax.grad(loss_fn)(p)))
  for _ in range(15):
    p, state = step(p, state)
  assert float(loss_fn(p)) < before - 0.1

  # The stage: trained, saved, read back by the real loader (64 tokens of 2 x 2 px).
  trained_model, trained = toy_encoder.train(config, sd_dir, str(tmp_path / 'encoder'))
  vision_dir = str(tmp_path / 'encoder' / 'vision')
  toy_encoder.save(vision_dir, config, trained, reproduction.encoder_stamp(config))
  vision = weights.load_vision_encoder(vision_dir)
  tokens = encoders.image_features(vision.model, vision.params, pixels[:2])
  assert tokens.shape == (2, 64, 16)
  direct = trained_model.apply({'params': trained['vision']}, jnp.transpose(
      pixels[:2], (0, 2, 3, 1))).hidden_states[-2][:, 1:]
  np.testing.assert_allclose(np.asarray(tokens), np.asarray(direct), atol=1e-5)

  gate = toy_encoder.gate(config, sd_dir, vision_dir, random_vision_dir)
  assert 0.0 <= gate['contrastive']['retrieval'] <= 1.0
  assert 0.1 < gate['retrieval_chance'] < 0.3
  for tower in ('contrastive', 'random'):
    for key in ('body_accuracy', 'accent_accuracy'):
      assert 0.0 <= gate[tower][key] <= 1.0
  assert isinstance(gate['passes'], bool)


def test_adapter_stamp_names_the_encoder_only_when_trained():
  config = toy_config.get_config('smoke')
  random_stamp = reproduction.adapter_stamp(config, {}, 0)
  assert 'subject_encoder' not in random_stamp  # the random tower's adapters keep theirs
  config.toy.subject_encoder = 'contrastive'
  stamp = reproduction.adapter_stamp(config, {}, 0)
  config.toy.encoder.steps = 7
  assert stamp['subject_encoder'] != reproduction.adapter_stamp(config, {}, 0)['subject_encoder']
