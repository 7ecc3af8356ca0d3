"""Precomputed encoder features: the frozen VAE and CLIP encoders run once, not per step.

With `config.data.precompute_features`, training reads, instead of images and captions,
what the frozen encoders make of them (`training.encode_features`):

  latent_mean, latent_std  the VAE posterior's moments (h, w, c), unscaled; every step
                           still draws its own z_0 = scaling_factor * (mean + std * eps)
  text                     the CLIP text features f_ct (L, c_t)
  image                    the CLIP vision tokens f_ci (n, c_i) of the same image

stored in `config.data.feature_dtype` ('float16' by default: half the size of float32,
with 3 more mantissa bits than bfloat16, which matters for z_0 at small t) as one
ArrayRecord file next to the prepared image set, one record per image record, in the
same order. So the grain loader, its sampler and its checkpointed position are those of
the image set; a run may switch the option on or off when it resumes.

  source = get_feature_source(config, workdir, sd, vision)  # prepares what is missing
  loader = input_pipeline.create_train_loader(config, source, None,
                                              preprocess=DecodeFeatures(source.layout))

The features sit in `<image set>/features/<feature_dtype>_<digest>/`, the digest a hash
of everything that determines them (`cache_key`): the encoders' weights (hashed by
content) and configs, the tokenizer, the CLIP preprocessing, the resolution, the
frozen and stored dtypes. A rerun with the same key reuses them; any change prepares a
new set beside the old one (delete that to reclaim its space). Library versions are
not part of the key.

Only what the prepared images carry can be trained on: the images are resized and
centre-cropped once when the set is prepared and never augmented afterwards, so
precomputing loses nothing today. A flipped image's latents are not the flipped latents
(the VAE and CLIP are not mirror-symmetric), and a crop's CLIP tokens are not a crop of
the tokens; see the README for what a future augmentation could keep.

Config keys read: `data.precompute_features` (bool), `data.feature_dtype`,
`data.batch_size`, `train.frozen_dtype`, `resolution`, and the data keys of
`input_pipeline`.
"""
import functools
import hashlib
import json
import os
import time
from typing import Any, Mapping

from absl import logging
from array_record.python import array_record_module
from etils import epath
import grain
import jax
import jax.numpy as jnp
import numpy as np

from realcustom_jax import model as model_lib
from realcustom_jax.runtime import sharding
from realcustom_jax import adapter_training as training
from realcustom_jax.loading import weights
from realcustom_jax import pipelines
from realcustom_jax import training_inputs
from train import input_pipeline

FORMAT_VERSION = 1  # bump when what a record holds, or how it is computed, changes
FEATURE_DTYPES = ('float16', 'bfloat16', 'float32')
FIELDS = ('latent_mean', 'latent_std', 'text', 'image')  # the order within a record
FEATURES_DIR = 'features'
META_FILE = 'features.json'  # written last: its presence marks a complete set
RECORDS_FILE = 'features.array_record'
_LOG_EVERY = 50  # batches


def enabled(config) -> bool:
  return bool(config.data.get('precompute_features', False))


def check_config(config, family=None) -> None:
  """Raises ValueError (one line) for a feature dtype that cannot be stored, or a model
  family whose features are not implemented (the release's); `family` defaults to the
  config's (`pipelines.family_for`)."""
  if not enabled(config):
    return
  family = family or pipelines.family_for(config)
  if not family.supports_precompute:
    raise ValueError(f'config.data.precompute_features is not implemented for the '
                     f'{family.name} family yet: train with the encoders in the step')
  if config.data.get('subject_reference', 'self') != 'self':
    raise ValueError('config.data.precompute_features stores the training image\'s own '
                     'subject features: it needs config.data.subject_reference=\'self\'')
  dtype = config.data.get('feature_dtype', 'float16')
  if dtype not in FEATURE_DTYPES:
    raise ValueError(f'config.data.feature_dtype must be one of {FEATURE_DTYPES} with '
                     f'config.data.precompute_features, got {dtype!r}')


# ---------------------------------------------------------------------------------
# What determines the features
# ---------------------------------------------------------------------------------


def _tree_digest(tree: Any) -> str:
  """Hash of a parameter tree's names, shapes, dtypes and values."""
  h = hashlib.sha1()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    value = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}\n'.encode())
    h.update(value.tobytes())
  return h.hexdigest()


def _tokenizer_digest(tokenizer) -> str:
  """Hash of what maps a caption to ids: vocabulary, BPE merges, length, padding."""
  h = hashlib.sha1()
  h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
  merges = sorted((' '.join(pair), rank) for pair, rank in
                  getattr(tokenizer, 'bpe_ranks', {}).items())
  h.update(json.dumps(merges).encode())
  h.update(f'{type(tokenizer).__name__}|{tokenizer.model_max_length}|'
           f'{tokenizer.pad_token}'.encode())
  return h.hexdigest()


def _model_config(config: Mapping[str, Any]) -> dict:
  """A model config without its private keys (paths, library versions)."""
  return {k: v for k, v in dict(config).items()
          if not k.startswith('_') and k != 'transformers_version'}


def cache_key(config, sd: weights.StableDiffusionComponents,
              vision: weights.VisionEncoder) -> dict:
  """Everything the stored features depend on besides the images and captions (whose
  set the features directory is nested in). JSON-able; its hash names the directory."""
  return {
      'format': FORMAT_VERSION,
      'resolution': int(config.resolution),
      'feature_dtype': config.data.get('feature_dtype', 'float16'),
      'frozen_dtype': config.train.get('frozen_dtype', 'float32'),
      # `encode` reads the encoder and quant_conv only: a new decoder keeps the features.
      'vae': {'config': _model_config(sd.vae.config),
              'params': _tree_digest({k: sd.vae_params[k] for k in ('encoder', 'quant_conv')})},
      'text': {'config': _model_config(sd.text_encoder.config.to_dict()),
               'params': _tree_digest(sd.text_params),
               'tokenizer': _tokenizer_digest(sd.tokenizer)},
      'vision': {'config': _model_config(vision.model.config.to_dict()),
                 'params': _tree_digest(vision.params),
                 'resize': int(vision.resize_size), 'size': int(vision.image_size),
                 'mean': [float(x) for x in vision.mean], 'std': [float(x) for x in vision.std]},
  }


def features_dir(image_dir: str | os.PathLike[str], key: Mapping[str, Any]) -> epath.Path:
  """Where the features of the image set in `image_dir` under `key` live."""
  digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
  return epath.Path(image_dir) / FEATURES_DIR / f'{key["feature_dtype"]}_{digest[:12]}'


def record_bytes(layout: Mapping[str, tuple[tuple[int, ...], str]]) -> int:
  """Bytes of one record (what precomputation costs on disk per image)."""
  return sum(int(np.prod(shape)) * jnp.dtype(dtype).itemsize
             for shape, dtype in layout.values())


# ---------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------


class DecodeFeatures(grain.transforms.Map):
  """Record bytes -> {field: array of the stored dtype and per-record shape}."""

  def __init__(self, layout: Mapping[str, tuple[tuple[int, ...], str]]):
    self._layout = [(name, tuple(shape), jnp.dtype(dtype))
                    for name, (shape, dtype) in layout.items()]

  def map(self, element: bytes) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, shape, dtype in self._layout:
      count = int(np.prod(shape))
      out[name] = np.frombuffer(element, dtype, count, offset).reshape(shape)
      offset += count * dtype.itemsize
    if offset != len(element):
      raise ValueError(f'a feature record holds {len(element)} bytes, its layout {offset}')
    return out


class FeatureSource:
  """The stored features as a grain random-access source (items are record bytes).

  Its repr is the image source's: grain checks a restored iterator against it, and the
  records are the image set's, one to one and in its order, so an iterator position
  saved with either source resumes with the other.
  """

  def __init__(self, path: str | os.PathLike[str], image_source: Any):
    path = epath.Path(path)
    meta = json.loads((path / META_FILE).read_text())
    self.path = path
    self.layout = {k: (tuple(s), d) for k, (s, d) in meta['layout'].items()}
    self._records = grain.sources.ArrayRecordDataSource([os.fspath(path / RECORDS_FILE)])
    self._repr = repr(image_source)
    if len(self._records) != len(image_source):
      raise ValueError(f'{path} holds {len(self._records)} feature records for '
                       f'{len(image_source)} images: delete it to prepare it again')

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index) -> bytes:
    return self._records[index]

  def __repr__(self) -> str:
    return self._repr


# ---------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------


def _pass_mesh(config) -> tuple[Any, int]:
  """A data-parallel mesh over this process's devices and the batch of the pass.

  Local devices only: on several hosts process 0 prepares alone while the others wait,
  as for the image set. The per-device batch is training's.
  """
  devices = jax.local_devices()
  mesh = sharding.create_mesh({'data': -1, 'fsdp': 1}, devices)
  per_device = max(1, int(config.data.batch_size) // jax.device_count())
  return mesh, per_device * len(devices)


def _sharded_encoder(config, sd: weights.StableDiffusionComponents,
                     vision: weights.VisionEncoder, dtype: str):
  """The frozen encoders as one jitted, sharded function of a batch.

  Returns:
    (encode(frozen, batch) -> {field: features in `dtype`}, the placed frozen
     parameters, the batch's shardings, the pass's global batch size).
  """
  models, _ = training.build_models(config, sd, vision)
  mesh, batch_size = _pass_mesh(config)
  frozen = training.cast_floating(
      {'vae': sd.vae_params, 'text': sd.text_params, 'vision': vision.params},
      model_lib.DTYPES[config.train.get('frozen_dtype', 'float32')])
  frozen_sh = sharding.param_shardings(frozen, mesh)
  frozen = sharding.device_put_tree(frozen, frozen_sh)
  batch_sh = {'image': sharding.batch_sharding(mesh, 4),
              'input_ids': sharding.batch_sharding(mesh, 2)}

  def encode(frozen, batch):
    f = training.encode_features(frozen, batch, models)
    return {name: f[name].astype(dtype) for name in FIELDS}

  return jax.jit(encode, in_shardings=(frozen_sh, batch_sh)), frozen, batch_sh, batch_size


def _write_records(path: epath.Path, encode, frozen, batch_sh, load, n: int,
                   batch_size: int, dtype: str) -> None:
  """Encodes the n records batch by batch (`load(start)`) into `path`'s ArrayRecord file.

  Each batch is fetched one batch late, so the device works while the host writes.

  Raises:
    ValueError: features that are not finite in `dtype`.
  """
  writer = array_record_module.ArrayRecordWriter(os.fspath(path / RECORDS_FILE),
                                                 'group_size:1')

  def write(start: int, features: dict) -> None:
    host = jax.device_get(features)
    for name in FIELDS:
      if not np.isfinite(host[name].astype(np.float32)).all():
        raise ValueError(
            f'the encoders\' {name} features of records {start}..{start + batch_size - 1} '
            f'are not finite in {dtype}' + (
                "; store them as config.data.feature_dtype='float32'" if dtype != 'float32'
                else ''))
    # The last batch is padded with its final record; the padding is not written.
    for row in range(min(batch_size, n - start)):
      writer.write(b''.join(np.ascontiguousarray(host[name][row]).tobytes()
                            for name in FIELDS))

  try:
    pending = None
    for b, start in enumerate(range(0, n, batch_size)):
      features = encode(frozen, {k: jax.device_put(v, batch_sh[k])
                                 for k, v in load(start).items()})
      if pending is not None:
        write(*pending)
      pending = (start, features)
      if b % _LOG_EVERY == 0:
        logging.info('precomputing features: %d / %d images', start, n)
    write(*pending)
  finally:
    writer.close()


def prepare_features(config, image_dir: str | os.PathLike[str], image_source: Any,
                     sd: weights.StableDiffusionComponents,
                     vision: weights.VisionEncoder) -> epath.Path:
  """Runs the frozen encoders over `image_source` once and stores their outputs.

  A no-op when the features of this image set and key are stored. Otherwise writes
  them to a temporary directory renamed when complete (and removed on an error), so an
  interrupted pass leaves nothing a later run would take as done.

  Args:
    config: the experiment config (module docstring for the keys).
    image_dir: the prepared image set's directory (the builder's `data_dir`).
    image_source: its data source (records with 'image' uint8 and 'caption').
    sd: the frozen Stable Diffusion components (VAE, text encoder, tokenizer).
    vision: the frozen CLIP vision encoder.

  Returns:
    The features directory.

  Raises:
    ValueError: features that are not finite in `config.data.feature_dtype`.
  """
  check_config(config)
  dtype = config.data.get('feature_dtype', 'float16')
  key = cache_key(config, sd, vision)
  out = features_dir(image_dir, key)
  if (out / META_FILE).exists():
    logging.info('precomputed features %s already prepared', out)
    return out
  t0 = time.perf_counter()
  encode, frozen, batch_sh, batch_size = _sharded_encoder(config, sd, vision, dtype)
  n = len(image_source)
  shapes = jax.eval_shape(encode, frozen, {
      'image': jax.ShapeDtypeStruct((batch_size, config.resolution, config.resolution, 3),
                                    np.float32),
      'input_ids': jax.ShapeDtypeStruct((batch_size, sd.tokenizer.model_max_length),
                                        np.int32)})
  layout = {name: (tuple(shapes[name].shape[1:]), dtype) for name in FIELDS}  # record order
  logging.info('precomputing the encoders\' features of %d images into %s (%.1f MB)', n,
               out, n * record_bytes(layout) / 1e6)
  # The loader's own transform: the encoders see exactly what the in-step path sees.
  preprocess = training_inputs.TrainPreprocess(
      functools.partial(training_inputs.tokenize_caption, sd.tokenizer))

  def load(start: int) -> dict[str, np.ndarray]:
    rows = [preprocess.map(image_source[min(i, n - 1)])
            for i in range(start, start + batch_size)]
    return {k: np.stack([r[k] for r in rows]) for k in ('image', 'input_ids')}

  tmp = out.parent / f'{out.name}.tmp{os.getpid()}'
  tmp.mkdir(parents=True, exist_ok=True)
  try:
    _write_records(tmp, encode, frozen, batch_sh, load, n, batch_size, dtype)
  except BaseException:
    tmp.rmtree()  # a failed or interrupted pass leaves nothing behind
    raise
  meta = {'key': key, 'num_records': n, 'image_dir': os.fspath(image_dir),
          'layout': {k: [list(s), d] for k, (s, d) in layout.items()},
          'seconds': round(time.perf_counter() - t0, 1)}
  (tmp / META_FILE).write_text(json.dumps(meta, indent=2, default=str))
  tmp.rename(out)
  logging.info('precomputed the features of %d images in %.1fs', n, meta['seconds'])
  return out


def get_feature_source(config, workdir: str | os.PathLike[str],
                       sd: weights.StableDiffusionComponents,
                       vision: weights.VisionEncoder) -> FeatureSource:
  """The features of the training set, prepared first where missing (the image set too).

  On several hosts process 0 prepares while the others wait at a barrier, as
  `input_pipeline.get_data_source` does for the images; the directory must be shared.

  Raises:
    ValueError: a data-config mistake, or features that cannot be stored as asked.
  """
  check_config(config)
  builder = input_pipeline.get_data_builder(config, workdir)
  image_source = builder.as_data_source(split='train')
  prepare = functools.partial(prepare_features, config, builder.data_dir, image_source, sd,
                              vision)
  path = input_pipeline.prepared_by_process_zero_first(prepare, 'realcustom_features_prepared')
  return FeatureSource(path, image_source)
