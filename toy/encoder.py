"""A CLIP-like subject encoder for the toy world (issue 27, step 3).

The paper's score nets relate the prompt's text context to CLIP image tokens, which
CLIP's training aligned with text. The toy world's default subject encoder is a frozen
*random* tower (toy/base.py), whose tokens say little about what they show. This stage
trains one as CLIP was trained, at toy size:

* a CLIP vision tower with finer patches (`config.toy.encoder.vision`: 2 x 2 px, 64
  tokens of a 16 px image, against the random tower's 16 of 4 x 4 px),
* contrastively (a symmetric InfoNCE over the batch, learned temperature) against the
  base model's *frozen* toy text encoder: each image's caption is its naming caption
  ("a red and white circle on a blue background"), embedded as the mean of its token
  features (the toy text encoder has no transformer layer, so its end token carries no
  sentence) through a learned projection; the image side is the tower's pooled class
  token through a learned projection. Identical captions in a batch are all positives.
* on the training world's scenes (training identities only).

Its gate (`gate`), before any adapter reads it:

* retrieval: for scenes of the held-out identities, the naming caption of the right
  identity among the eight held-out identities' captions (same shape, same background;
  chance 1/8);
* a linear probe of the identity colours (body, accent; 8 classes each) from the tokens
  the adapter reads (mean over tokens), trained on training-identity scenes and scored on
  held-out-identity scenes, beside the same probe on the random tower;
* the object-token probe of Gate A (`selection_gate.object_token_probe`).

`save` writes the tower in the transformers layout (config.json, flax_model.msgpack,
preprocessor_config.json) that `weights.load_vision_encoder` reads, so the adapters and
the pipeline take it by path like any CLIP vision directory.
"""
import json
import os
import shutil

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from transformers import CLIPImageProcessor
from transformers import CLIPVisionConfig

from realcustom_jax import clip
from realcustom_jax import encoders
from realcustom_jax.loading import weights
from toy import base as toy_base
from toy import selection_gate
from toy import world as toy_world

_INIT_SEED = 5  # the tower's and projections' init key (the loop's key is the config seed)


def vision_config(config) -> CLIPVisionConfig:
  """The trained tower's CLIPVisionConfig (`config.toy.encoder.vision`)."""
  return CLIPVisionConfig(hidden_act='quick_gelu', **dict(config.toy.encoder.vision))


def _preprocessing(size: int) -> weights.VisionEncoder:
  """The preprocessing settings the saved tower will load with (CLIP's mean and std)."""
  return weights.VisionEncoder(model=None, params=None, image_size=size, resize_size=size,
                               mean=weights.CLIP_MEAN, std=weights.CLIP_STD,
                               resample=weights.BICUBIC)


def pixel_values(images: np.ndarray, size: int) -> np.ndarray:
  """(N, 3, S, S) float32 from (N, S, S, 3) uint8, as the pipeline preprocesses subjects."""
  return encoders.preprocess_subject([Image.fromarray(i) for i in images], _preprocessing(size))


def caption_features(text_encoder, text_params, tokenizer, captions: list[str]) -> np.ndarray:
  """(N, c_t) mean of each caption's token features (BOS to EOS, padding left out)."""
  ids = encoders.tokenize(tokenizer, captions)
  feats = np.asarray(encoders.encode_text(text_encoder, text_params, ids), np.float32)
  real = np.asarray(tokenizer(captions, padding='max_length',
                              max_length=ids.shape[1]).attention_mask, np.float32)
  return (feats * real[..., None]).sum(1) / real.sum(1, keepdims=True)


def embed_images(model, params, pixels) -> jax.Array:
  """(B, d) unit image embeddings: the pooled class token through the projection."""
  pooled = model.apply({'params': params['vision']}, jnp.transpose(pixels, (0, 2, 3, 1))).pooled
  e = pooled @ params['image_projection']
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def embed_texts(params, caption_feats) -> jax.Array:
  """(B, d) unit text embeddings of `caption_features` rows."""
  e = caption_feats @ params['text_projection']
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def contrastive_loss(image_emb, text_emb, logit_scale, caption_ids) -> jax.Array:
  """CLIP's symmetric InfoNCE; rows with the same caption are all positives.

  Args:
    image_emb, text_emb: (B, d) unit embeddings of the batch's images and captions.
    logit_scale: log of the inverse temperature (learned, clipped at log 100 as CLIP).
    caption_ids: (B,) int, which caption each row has (duplicates share the target).
  """
  scale = jnp.exp(jnp.minimum(logit_scale, jnp.log(100.0)))
  logits = scale * image_emb @ text_emb.T
  same = (caption_ids[:, None] == caption_ids[None, :]).astype(jnp.float32)
  targets = same / same.sum(-1, keepdims=True)
  image_to_text = optax.softmax_cross_entropy(logits, targets)
  text_to_image = optax.softmax_cross_entropy(logits.T, targets)
  return 0.5 * (image_to_text.mean() + text_to_image.mean())


def build_model(config) -> clip.CLIPVisionModel:
  """The tower of `vision_config` (the project's CLIP vision module)."""
  return clip.CLIPVisionModel(clip.CLIPConfig.from_dict(vision_config(config)))


def init_params(config, model: clip.CLIPVisionModel, text_dim: int) -> dict:
  vc = model.config
  k_vision, k_img, k_txt = jax.random.split(jax.random.PRNGKey(_INIT_SEED), 3)
  d = int(config.toy.encoder.embed_dim)
  return {
      'vision': clip.init_params(model, k_vision),
      'image_projection': jax.random.normal(k_img, (vc.hidden_size, d)) / np.sqrt(vc.hidden_size),
      'text_projection': jax.random.normal(k_txt, (text_dim, d)) / np.sqrt(text_dim),
      'logit_scale': jnp.asarray(np.log(1 / 0.07), jnp.float32),
  }


def train(config, sd_dir: str, workdir: str) -> tuple[clip.CLIPVisionModel, dict]:
  """Trains the tower on the training world's scenes (resumable); returns it and its
  parameters (`vision` the tower's, plus the projections and the temperature)."""
  res = int(config.resolution)
  e = config.toy.encoder
  components = weights.load_stable_diffusion(sd_dir)
  scenes = list(toy_world.iter_scenes(int(config.toy.num_train_images), res, config.seed))
  images = np.stack([toy_world.render(sc, res)[0] for sc in scenes])
  named = [sc.named_caption for sc in scenes]
  unique = sorted(set(named))
  caption_ids = jnp.asarray([unique.index(c) for c in named], jnp.int32)
  feats = jnp.asarray(caption_features(components.text_encoder, components.text_params,
                                       components.tokenizer, unique))
  model = build_model(config)
  pixels = jnp.asarray(pixel_values(images, model.config.image_size))
  params = init_params(config, model, feats.shape[-1])
  batch = int(e.batch)

  def loss_fn(p, key):
    idx = jax.random.choice(key, pixels.shape[0], (batch,), replace=False)
    ids = caption_ids[idx]
    return contrastive_loss(embed_images(model, p, pixels[idx]), embed_texts(p, feats[ids]),
                            p['logit_scale'], ids)

  optimizer = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, float(e.lr), min(100, int(e.steps) // 2), int(e.steps)), weight_decay=0.01)
  params = toy_base._train_loop(  # pylint: disable=protected-access
      'encoder', workdir, params, loss_fn, optimizer, int(e.steps),
      int(config.toy.checkpoint_every), config.seed, log_every=min(100, int(e.steps)))
  return model, params


def save(vision_dir: str, config, params: dict, stamp: dict) -> None:
  """Writes the tower where `weights.load_vision_encoder` reads it, with its projections
  and `stamp`; written aside and renamed, so a directory there is complete."""
  tmp = vision_dir + '.partial'
  shutil.rmtree(tmp, ignore_errors=True)
  tower_config = vision_config(config)
  weights.save_clip_tower(tmp, tower_config, params['vision'], 'vision')
  size = tower_config.image_size
  CLIPImageProcessor(size={'shortest_edge': size},
                     crop_size={'height': size, 'width': size}).save_pretrained(tmp)
  heads = {k: np.asarray(params[k]).tolist() for k in ('image_projection', 'text_projection',
                                                       'logit_scale')}
  # The projections and temperature (the gate's retrieval reads them; the adapter does not).
  with open(os.path.join(tmp, 'projections.json'), 'w') as f:
    json.dump(heads, f)
  with open(os.path.join(tmp, 'encoder_stamp.json'), 'w') as f:
    json.dump(stamp, f)
  shutil.rmtree(vision_dir, ignore_errors=True)
  os.replace(tmp, vision_dir)


# ---------------------------------------------------------------------------------
# The gate
# ---------------------------------------------------------------------------------


def _held_out_scenes(config, n: int) -> list[toy_world.Scene]:
  rng = np.random.default_rng(config.seed + 2)
  return [toy_world.random_scene(rng, int(config.resolution), toy_world.HELD_OUT)
          for _ in range(n)]


def retrieval_accuracy(model, params, components, scenes, size: int) -> float:
  """Top-1 share of scenes whose naming caption beats the other held-out identities'
  (same shape and background; identities whose colours clash with the background are
  left out of a scene's candidates)."""
  pixels = pixel_values(np.stack([toy_world.render(sc, int(size))[0] for sc in scenes]), size)
  img = np.asarray(embed_images(model, params, jnp.asarray(pixels)))
  candidates = [[i for i in toy_world.HELD_OUT if sc.background not in i] for sc in scenes]
  captions = sorted({toy_world.named_caption(sc.shape, *i, sc.background)
                     for sc, ids in zip(scenes, candidates) for i in ids})
  text = np.asarray(embed_texts(params, jnp.asarray(caption_features(
      components.text_encoder, components.text_params, components.tokenizer, captions))))
  row = {c: k for k, c in enumerate(captions)}
  hits = []
  for sc, e, ids in zip(scenes, img, candidates):
    scores = [text[row[toy_world.named_caption(sc.shape, *i, sc.background)]] @ e for i in ids]
    hits.append(ids[int(np.argmax(scores))] == sc.identity)
  return float(np.mean(hits))


def _softmax_probe(x_train, y_train, x_test, y_test, classes: int, steps: int = 500) -> float:
  """Held-out accuracy of a multinomial logistic regression (standardised features)."""
  mean, std = x_train.mean(0), x_train.std(0) + 1e-6
  xs = [np.concatenate([(x - mean) / std, np.ones((len(x), 1))], 1) for x in (x_train, x_test)]
  w = np.zeros((xs[0].shape[1], classes))
  onehot = np.eye(classes)[y_train]
  for _ in range(steps):
    z = xs[0] @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= 0.5 * xs[0].T @ (p - onehot) / len(xs[0])
  return float(np.mean(np.argmax(xs[1] @ w, 1) == y_test))


def identity_probe(train, test, train_scenes, test_scenes) -> dict:
  """Body and accent colour read linearly from the tokens the adapter reads: their mean
  weighted by each token's object share (what the subject's tokens say), trained on
  `train_scenes`, scored on `test_scenes` (held-out identities: unseen colour pairs).

  Args:
    train, test: (features, object shares) of the scenes (`selection_gate.subject_tokens`).
  """
  pooled = lambda feats, areas: (np.einsum('bn,bnc->bc', areas, feats)
                                 / areas.sum(1, keepdims=True))
  x_train, x_test = pooled(*train), pooled(*test)
  out = {}
  for part in ('body', 'accent'):
    label = lambda scenes, p=part: np.asarray([toy_world.COLORS.index(getattr(s, p))
                                               for s in scenes])
    out[f'{part}_accuracy'] = _softmax_probe(x_train, label(train_scenes), x_test,
                                             label(test_scenes), len(toy_world.COLORS))
  return out


def gate(config, sd_dir: str, vision_dir: str, random_vision_dir: str) -> dict:
  """The encoder gate (module doc) for the tower in `vision_dir`, the random tower in
  `random_vision_dir` beside it; 'passes' needs held-out retrieval >= `config.toy.
  encoder.min_retrieval` and identity probes above the random tower's."""
  res = int(config.resolution)
  n = int(config.toy.probe_images)
  components = weights.load_stable_diffusion(sd_dir)
  train_scenes = list(toy_world.iter_scenes(n, res, config.seed + 1))
  test_scenes = _held_out_scenes(config, max(n // 4, 8))
  out, towers = {}, {}
  for name, path in (('contrastive', vision_dir), ('random', random_vision_dir)):
    towers[name] = vision = weights.load_vision_encoder(path)
    train = selection_gate.subject_tokens(vision, train_scenes, res)
    test = selection_gate.subject_tokens(vision, test_scenes, res)
    out[name] = {**identity_probe(train, test, train_scenes, test_scenes),
                 'object_probe': selection_gate.object_token_probe(*train)}
  with open(os.path.join(vision_dir, 'projections.json')) as f:
    heads = {k: jnp.asarray(v) for k, v in json.load(f).items()}
  vision = towers['contrastive']
  out['contrastive']['retrieval'] = retrieval_accuracy(
      vision.model, {'vision': vision.params, **heads}, components, test_scenes, res)
  out['retrieval_chance'] = float(np.mean([
      1.0 / sum(sc.background not in i for i in toy_world.HELD_OUT) for sc in test_scenes]))
  c, r = out['contrastive'], out['random']
  out['passes'] = bool(c['retrieval'] >= float(config.toy.encoder.min_retrieval)
                       and c['body_accuracy'] > r['body_accuracy']
                       and c['accent_accuracy'] > r['accent_accuracy'])
  logging.info('encoder gate: %s', out)
  return out

