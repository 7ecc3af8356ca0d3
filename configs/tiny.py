"""Embedded default: tiny random-init RealCustom that runs end to end on a CPU.

Nothing is downloaded: the UNet, VAE, CLIP text/vision encoders and the tokenizer are
built in code from `config.tiny` with fixed seeds, and training reads a procedurally
generated toy shard set.

  python -m train.main --config=configs/tiny.py --workdir=/tmp/rc_tiny
  python -m sample.main --config=configs/tiny.py --subject=toy.png \
      --prompt="a toy on the beach" --word=toy --out=out.png
  python -m benchmarks.sampling --config=configs/tiny.py
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Empty: build the tiny random models of `config.tiny`; else a local diffusers-format
  # Stable Diffusion directory (unet/, vae/, text_encoder/, tokenizer/, scheduler/).
  config.pretrained = ''
  # Empty with `pretrained` empty: the tiny CLIP vision model; else a local
  # transformers CLIPVisionModel directory (model.safetensors, preprocessor config).
  config.vision_encoder = ''
  config.allow_pickle = False  # refuse torch .bin weights unless set
  config.resolution = 32  # pixels; latents are resolution / vae factor

  # ---- Model: the adapter on top of the frozen UNet ----
  config.model = ml_collections.ConfigDict()
  config.model.scoring_hidden = 0  # width of the two score-net MLPs; 0 = image feature width
  config.model.fusion = 'timestep'  # Eq. 8; 'text', 'visual', 'mean' for Table 3 ablations
  config.model.dtype = 'float32'  # compute dtype of the frozen UNet ('bfloat16' on accelerators)
  config.model.attention_impl = 'xla'  # 'xla' | 'cudnn' (self-attention only)
  # Torch resizes the mask without antialiasing; jax.image.resize antialiases when it
  # downsamples unless told not to. False follows the authors (see README).
  config.model.mask_antialias = False

  # ---- Tiny random models (used when `pretrained` is empty) ----
  config.tiny = ml_collections.ConfigDict()
  config.tiny.unet = dict(
      sample_size=8, in_channels=4, out_channels=4,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
      block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
      cross_attention_dim=32, use_linear_projection=False)

  # ---- Sampling (Sec. 4.1) ----
  config.sampler = ml_collections.ConfigDict()
  config.sampler.num_steps = 10  # the paper uses 50 (configs/laion.py)
  config.sampler.guidance_text = 7.5  # w_t in Eq. 13
  config.sampler.guidance_image = 12.5  # w_i in Eq. 13
  config.sampler.gamma_scope = 0.25  # Eq. 11
  config.sampler.gamma_num = 0.8  # Eq. 10 at inference
  config.sampler.binary_mask = False  # Table 2 "binary" ablation
  return config
