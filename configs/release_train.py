"""Training the authors' released architecture (SDXL + SigLIP / DINOv2 + projector).

Fine-tune the released adapter on your data, or train it from scratch; the frozen SDXL
base and both ViT towers are read from local directories (docs/release.md,
"Fine-tuning the released model"):

  # once: convert the release's .pth (needs torch)
  python -m sample.convert_release --checkpoint=RealCustom_highres.pth \\
      --out=realcustom_highres.safetensors --allow_pickle
  python -m train.main --config=configs/release_train.py --workdir=/ckpt/rc_release \\
      --config.pretrained=/models/sdxl-base-1.0 \\
      --config.vision_encoder=/models/realcustom_vision \\
      --config.init_adapter=realcustom_highres.safetensors \\
      --config.data.shards_dir=/data/my_shards
  python -m train.export --workdir=/ckpt/rc_release --out=finetuned.safetensors
  # -> finetuned.safetensors (ours) and finetuned_release.safetensors (the release's
  #    own state-dict keys, for its torch code)
  python -m sample.main --config=configs/release.py --pretrained=/models/sdxl-base-1.0 \\
      --vision_encoder=/models/realcustom_vision --adapter=finetuned.safetensors \\
      --subject=dog.jpg --prompt="a dog in space" --word=dog --out=out.png

Without --config.init_adapter the adapter starts from scratch (every visual K/V a copy
of its layer's text K/V, the projector at its init). The release publishes no training
recipe: the trainable set (its projector and every attn2's to_k_vision / to_v_vision,
exactly what RealCustom_highres.pth holds), the loss (epsilon MSE, no mask in training)
and the dropout scheme are our reading of its code; the optimizer settings below are
assumptions (IP-Adapter's, a lower rate for fine-tuning). configs/release_train_tiny.py
runs the same on tiny random weights on a CPU.
"""
from configs import release
from configs import common


def get_config():
  config = release.get_config()  # pipeline='release', the encoder's views and layers
  config.pretrained = ''  # required: a diffusers SDXL base 1.0 directory
  config.vision_encoder = ''  # required: the two timm ViT folders side by side
  # '' = from scratch; a converted release adapter (sample.convert_release) or a
  # previous train.export output = fine-tuning from its exact values.
  config.init_adapter = ''
  # Square training images, pixels (SDXL's 1024; the release samples 1024 x 768). The
  # subject is the same image, prepared as the release prepares references (768 px).
  config.resolution = 1024

  # ---- Model: the release's adapter on the frozen SDXL UNet ----
  config.model.projector = 'release_highres'
  config.model.scoring = 'none'  # the release has no scoring module
  config.model.release_vision_dim = 2176  # SigLIP 1152 + DINOv2 1024
  config.model.release_dim_head = 64  # its MinAttention heads
  config.model.dtype = 'bfloat16'
  config.model.remat = 'dots'  # keep the matmul outputs, recompute norms and attention

  # ---- Data: LAION-style webdataset shards (docs/training.md) ----
  config.data = common.data_config()
  config.data.toy = False
  config.data.toy_num_images = 0
  config.data.shards_dir = ''  # required: img2dataset webdataset shards
  config.data.min_aesthetic = 0.0  # your data: no score filter by default
  config.data.batch_size = 16  # global (an assumption, not the authors')
  config.data.worker_count = 8

  # ---- Training ----
  config.train = common.train_config()  # the loop's keys; the release's own below
  config.train.visual_kv_init = 'copy_text'  # IP-Adapter's start (the release publishes none)
  config.train.num_steps = 20_000
  config.train.learning_rate = 1e-5  # fine-tuning; 1e-4 from scratch (IP-Adapter's)
  config.train.warmup_steps = 500
  config.train.grad_clip_norm = 1.0
  # One draw per row (IP-Adapter's scheme): the caption alone replaced by '', the subject
  # alone by the all-zero reference (the release's negative image), or both: what the
  # release's two guidance branches see at sampling.
  config.train.caption_dropout = 0.05
  config.train.subject_dropout = 0.05
  config.train.both_dropout = 0.05
  config.train.frozen_dtype = 'bfloat16'
  config.train.checkpoint_every = 1000
  config.train.log_every = 50

  config.mesh = common.mesh_config()
  return config
