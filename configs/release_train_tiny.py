"""configs/release_train.py on tiny random weights: trains on a CPU in a few minutes.

Nothing is downloaded: the first run writes a tiny SDXL directory, the two tiny timm
ViTs and a converted tiny release adapter (as configs/release_tiny.py does; needs torch
once), then trains on the generated coloured-shape shards.

  python -m train.main --config=configs/release_train_tiny.py --workdir=/tmp/rc_rel
  python -m train.export --workdir=/tmp/rc_rel --out=/tmp/rc_rel/adapter.safetensors
  python -m sample.main --config=configs/release_tiny.py \\
      --adapter=/tmp/rc_rel/adapter.safetensors --subject=toy.png \\
      --prompt="a toy on the beach" --word=toy --out=out.png

Fine-tuning instead of from scratch: --config.init_adapter=<the tiny release's
adapter.safetensors> (in ~/.cache/realcustom_jax/release_tiny/<hash>/).
"""
from configs import release_tiny
from configs import release_train
from configs import common


def get_config():
  config = release_train.get_config()
  tiny_release = release_tiny.get_config()
  config.tiny_release = tiny_release.tiny_release  # the same files as release_tiny.py
  config.vision = tiny_release.vision
  config.resolution = 32  # the tiny SDXL: VAE factor 2, UNet downsampling 4
  config.model.release_vision_dim = 2 * tiny_release.tiny_release.embed_dim
  config.model.release_dim_head = tiny_release.tiny_release.dim_head
  config.model.dtype = 'float32'
  config.model.remat = 'none'
  config.model.attention_impl = 'xla'

  config.data = common.data_config()  # the generated toy shards
  config.data.toy_num_images = 64
  config.data.batch_size = 4

  config.train.num_steps = 20
  config.train.learning_rate = 1e-3  # tiny random models: a visible loss drop in 20 steps
  config.train.warmup_steps = 0
  config.train.frozen_dtype = 'float32'
  config.train.checkpoint_every = 10
  config.train.log_every = 1
  return config
