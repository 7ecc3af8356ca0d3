"""The paper's setting (Sec. 4.1): SD 1.5 + CLIP ViT-L/14, LAION aesthetic subset.

Weights and data are read from local paths (nothing is downloaded):

  python -m train.main --config=configs/laion.py --workdir=/ckpt/realcustom \
      --config.pretrained=/models/stable-diffusion-v1-5 \
      --config.vision_encoder=/models/clip-vit-large-patch14 \
      --config.data.shards_dir=/data/laion_aesthetic_shards

  python -m train.export --workdir=/ckpt/realcustom --out=adapter.safetensors

  python -m sample.main --config=configs/laion.py --adapter=adapter.safetensors \
      --pretrained=/models/stable-diffusion-v1-5 \
      --vision_encoder=/models/clip-vit-large-patch14 \
      --subject=toy.jpg --prompt="a toy on the beach" --word=toy --out=out.png

The paper trains 160k iterations at lr 1e-4 on 16 A100s; its global batch is not
stated (ours: 16 per device x 16 = 256, an assumption). On a TPU pod or several GPU
hosts, run the same command on every host with --config.mesh.distributed=True.
"""
from configs import tiny


def get_config():
  config = tiny.get_config()  # same keys; everything that differs is set below
  config.pretrained = ''  # required: local diffusers SD 1.5 directory
  config.vision_encoder = ''  # required: local CLIP ViT-L/14 (vision) directory
  config.resolution = 512

  config.model.scoring_hidden = 0  # = image feature width (1024 for ViT-L/14)
  config.model.dtype = 'bfloat16'  # frozen UNet compute
  config.model.remat = 'dots'  # keep the matmul outputs, recompute norms and attention

  config.sampler.num_steps = 50  # DDIM 50 steps
  config.sampler.guidance_text = 7.5
  config.sampler.guidance_image = 12.5
  config.sampler.gamma_scope = 0.25
  config.sampler.gamma_num = 0.8

  config.data.toy = False
  config.data.toy_num_images = 0
  config.data.shards_dir = ''  # required: img2dataset webdataset shards
  config.data.min_aesthetic = 5.0  # aesthetic-score filter of LAION-5B (Sec. 4.1)
  config.data.batch_size = 256  # global (assumed; the paper does not state it)
  config.data.worker_count = 8
  # True: encoders once, before training (README "Precomputed features"); prepare them with
  # `python -m train.prepare ... --config.data.precompute_features=True` before a pod run.
  config.data.precompute_features = False

  config.train.num_steps = 160_000  # "16w iterations"
  config.train.learning_rate = 1e-4
  config.train.warmup_steps = 1000
  config.train.frozen_dtype = 'bfloat16'
  config.train.checkpoint_every = 1000
  config.train.max_to_keep = 3
  config.train.log_every = 50

  config.eval.images_per_prompt = 4
  return config
