"""The trained toy model that ships in the repository (toy/shipped/).

`python -m toy.reproduction --workdir=DIR` trains a base model and a RealCustom adapter
on the toy world; `python -m toy.shipped --workdir=DIR` then copies them here:

  toy/shipped/base.safetensors      UNet, VAE, text encoder, CLIP vision tower ('/'-joined
                                    keys under unet/, vae/, text_encoder/, vision/)
  toy/shipped/encoder.safetensors   the CLIP-like subject encoder (toy/encoder.py) the
                                    adapter was trained on; absent when it was trained on
                                    the base's random tower
  toy/shipped/adapter.safetensors   the adapter, as train.export writes it
  toy/shipped/files/...             the configs and the tokenizer (small JSON / text)
  toy/shipped/SHA256SUMS            checksums of the weight files

`materialise(dest)` writes them back out in the diffusers / transformers layouts the
real loaders read (`dest/sd`, `dest/vision` (the base's random tower), `dest/encoder`),
so everything downstream (the pipeline, `sample.main`, `make demo`, the regression test)
goes through the real loading code.
"""
import hashlib
import json
import os
import shutil
import sys

from absl import app
from absl import flags
import flax
from flax import traverse_util
import numpy as np
import safetensors.numpy

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shipped')
# (directory in the base model, its weights file, the key prefix in base.safetensors)
_WEIGHTS = (('sd/unet', 'diffusion_flax_model.msgpack', 'unet'),
            ('sd/vae', 'diffusion_flax_model.msgpack', 'vae'),
            ('sd/text_encoder', 'flax_model.msgpack', 'text_encoder'),
            ('vision', 'flax_model.msgpack', 'vision'))
# The subject encoder: its folder in the written-out model, its weights file.
_ENCODER = ('encoder', 'flax_model.msgpack')


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _flat_tensors(path: str, prefix: str = '') -> dict[str, np.ndarray]:
  """A Flax msgpack's leaves under '/'-joined keys (after `prefix/`)."""
  with open(path, 'rb') as f:
    tree = flax.serialization.msgpack_restore(f.read())
  return {f'{prefix}/{k}' if prefix else k: np.ascontiguousarray(v)
          for k, v in traverse_util.flatten_dict(tree, sep='/').items()}


def _write_msgpack(path: str, flat: dict[str, np.ndarray]) -> None:
  with open(path, 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(traverse_util.unflatten_dict(flat, sep='/')))


def _copy_small_files(src: str, dest: str) -> None:
  """Copies a model folder's files except the weights into `dest`."""
  for root, _, names in os.walk(src):
    rel = os.path.relpath(root, src)
    for name in names:
      if not name.endswith('.msgpack'):
        os.makedirs(os.path.join(dest, rel), exist_ok=True)
        shutil.copyfile(os.path.join(root, name), os.path.join(dest, rel, name))


def export(base_dir: str, adapter_path: str, out_dir: str = HERE,
           provenance: dict | None = None, encoder_dir: str | None = None) -> dict[str, str]:
  """Copies a trained base (toy.reproduction's base/), the adapter and, when the adapter
  was trained on it, the contrastive subject encoder (its encoder/vision/) into `out_dir`.

  Returns:
    {file name: sha256} of the weight files.
  """
  os.makedirs(out_dir, exist_ok=True)
  tensors = {}
  for sub, name, prefix in _WEIGHTS:
    tensors.update(_flat_tensors(os.path.join(base_dir, sub, name), prefix))
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, 'base.safetensors'))
  shutil.copyfile(adapter_path, os.path.join(out_dir, 'adapter.safetensors'))
  files = os.path.join(out_dir, 'files')
  shutil.rmtree(files, ignore_errors=True)
  for sub in ('sd', 'vision'):
    _copy_small_files(os.path.join(base_dir, sub), os.path.join(files, sub))
  weight_files = ['base.safetensors', 'adapter.safetensors']
  encoder_file = os.path.join(out_dir, 'encoder.safetensors')
  if encoder_dir is None:
    if os.path.exists(encoder_file):
      os.remove(encoder_file)
  else:
    safetensors.numpy.save_file(_flat_tensors(os.path.join(encoder_dir, _ENCODER[1])),
                                encoder_file)
    _copy_small_files(encoder_dir, os.path.join(files, _ENCODER[0]))
    weight_files.insert(1, 'encoder.safetensors')
  sums = {n: _sha256(os.path.join(out_dir, n)) for n in weight_files}
  with open(os.path.join(out_dir, 'SHA256SUMS'), 'w') as f:
    f.writelines(f'{h}  {n}\n' for n, h in sums.items())
  with open(os.path.join(out_dir, 'provenance.json'), 'w') as f:
    json.dump(provenance or {}, f, indent=2)
  return sums


def check(src: str = HERE) -> None:
  """ValueError (one line) when a shipped file is missing or its checksum differs."""
  sums_path = os.path.join(src, 'SHA256SUMS')
  if not os.path.isfile(sums_path):
    raise ValueError(f'no shipped toy model in {src} (python -m toy.shipped --workdir=...)')
  for line in open(sums_path):
    digest, name = line.split()
    path = os.path.join(src, name)
    if not os.path.isfile(path):
      raise ValueError(f'shipped toy model: {path} is missing')
    if _sha256(path) != digest:
      raise ValueError(f'shipped toy model: {path} does not match SHA256SUMS (a Git LFS '
                       'pointer, or a changed file?)')


def has_encoder(src: str = HERE) -> bool:
  """Whether the shipped adapter was trained on a shipped contrastive subject encoder."""
  return os.path.isfile(os.path.join(src, 'encoder.safetensors'))


def materialise(dest: str, src: str = HERE) -> tuple[str, str, str]:
  """Writes the shipped model in the diffusers layout under `dest` (once; reused after):
  `dest/sd`, `dest/vision` (the base's random tower) and, when shipped, `dest/encoder`
  (the contrastive subject encoder).

  Returns:
    (sd_dir, the subject encoder the adapter was trained on (dest/encoder, or
    dest/vision without one), adapter_path).
  """
  check(src)
  sd_dir, vision_dir = os.path.join(dest, 'sd'), os.path.join(dest, 'vision')
  if has_encoder(src):
    vision_dir = os.path.join(dest, _ENCODER[0])
  stamp = os.path.join(dest, 'materialised_from')
  digest = _sha256(os.path.join(src, 'SHA256SUMS'))
  if not (os.path.isfile(stamp) and open(stamp).read() == digest):
    tmp = f'{dest}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(os.path.join(src, 'files'), tmp)
    tensors = safetensors.numpy.load_file(os.path.join(src, 'base.safetensors'))
    for sub, name, prefix in _WEIGHTS:
      _write_msgpack(os.path.join(tmp, sub, name), {
          k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + '/')})
    if has_encoder(src):
      _write_msgpack(os.path.join(tmp, *_ENCODER), safetensors.numpy.load_file(
          os.path.join(src, 'encoder.safetensors')))
    with open(os.path.join(tmp, 'materialised_from'), 'w') as f:
      f.write(digest)
    if os.path.islink(dest):  # a link to an older copy: replaced, its target left alone
      os.unlink(dest)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    os.replace(tmp, dest)
  return sd_dir, vision_dir, os.path.join(src, 'adapter.safetensors')


def main(argv):
  if len(argv) > 1:
    print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
    sys.exit(2)
  workdir = flags.FLAGS.workdir or ''
  # base/ from a run from scratch, shipped_base/ from a run with --base=shipped.
  base = next((os.path.join(workdir, b) for b in ('base', 'shipped_base')
               if os.path.isfile(os.path.join(workdir, b, 'sd', 'model_index.json'))), None)
  adapter_dir = f'adapter_{flags.FLAGS.adapter}/seed{flags.FLAGS.seed}'
  adapter = os.path.join(workdir, adapter_dir, 'adapter.safetensors')
  if not workdir or base is None or not os.path.isfile(adapter):
    print(f'error: --workdir={workdir} holds no finished toy reproduction (base/sd or '
          f'shipped_base/sd, and {adapter_dir}/adapter.safetensors)', file=sys.stderr)
    sys.exit(2)
  encoder_dir = None
  with open(os.path.join(workdir, adapter_dir, 'fingerprint.json')) as f:
    trained_on_encoder = 'subject_encoder' in json.load(f)
  if trained_on_encoder:  # trained on the contrastive tower (reproduction.adapter_stamp)
    encoder_dir = os.path.join(workdir, 'encoder', 'vision')
    if not os.path.isfile(os.path.join(encoder_dir, _ENCODER[1])):
      print(f'error: {adapter_dir} was trained on the contrastive subject encoder, but '
            f'{encoder_dir} holds none', file=sys.stderr)
      sys.exit(2)
  results = os.path.join(workdir, 'eval', 'results.json')
  provenance = {'command': 'python -m toy.reproduction --workdir=DIR && '
                           'python -m toy.shipped --workdir=DIR '
                           f'--adapter={flags.FLAGS.adapter} --seed={flags.FLAGS.seed}',
                'adapter': flags.FLAGS.adapter, 'training_seed': flags.FLAGS.seed,
                'subject_encoder': 'contrastive' if encoder_dir else 'random'}
  if os.path.isfile(results):
    with open(results) as f:
      r = json.load(f)
    for key in ('gates', 'target', 'encoder_gate', 'wall_s'):
      provenance[key] = r.get(key)
  for name, digest in export(base, adapter, provenance=provenance,
                             encoder_dir=encoder_dir).items():
    print(f'{digest}  toy/shipped/{name}')


if __name__ == '__main__':
  # Defined only when run: the tests import this module beside other entry points.
  flags.DEFINE_string('workdir', None, 'A finished `python -m toy.reproduction` workdir.')
  flags.DEFINE_string('adapter', 'adaptive', 'Which trained adapter to ship '
                      '(config.toy.main_adapter of the run).')
  flags.DEFINE_integer('seed', 0, 'Its training seed.')
  app.run(main)
