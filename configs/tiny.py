"""Embedded default: tiny random-init RealCustom that runs end to end on a CPU.

Nothing is downloaded: the UNet, VAE, CLIP text/vision encoders and the tokenizer are
built in code from `config.tiny` with fixed seeds, and training reads a procedurally
generated toy shard set.

  python -m train.main --config=configs/tiny.py --workdir=/tmp/rc_tiny
  python -m sample.main --config=configs/tiny.py --subject=toy.png \
      --prompt="a toy on the beach" --word=toy --out=out.png
  python -m benchmarks.sampling --config=configs/tiny.py

The keys are configs/laion.py's (the paper's config) at these sizes:
`laion.get_config('runlocal')`, as big_vision's `runlocal` variants.
"""
from configs import laion


def get_config():
  return laion.get_config('runlocal')
