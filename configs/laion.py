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

`get_config('runlocal')` (`--config=configs/laion.py:runlocal`, the same as
configs/tiny.py) gives the same keys at the embedded default's sizes: tiny random
models built in code, generated toy shards, a CPU.
"""
import ml_collections

from configs import common


def get_config(arg: str = ''):
  """The paper's config; `arg='runlocal'`: the embedded default's sizes (configs/tiny.py)."""
  runlocal = arg == 'runlocal'
  if arg not in ('', 'runlocal'):
    raise ValueError(f"configs/laion.py takes '' or 'runlocal', got {arg!r}")
  config = ml_collections.ConfigDict()
  config.seed = 0
  # A local diffusers-format Stable Diffusion directory (unet/, vae/, text_encoder/,
  # tokenizer/, scheduler/); required but with runlocal, where empty builds the tiny
  # random models of `config.tiny`.
  config.pretrained = ''
  # Empty with `pretrained` empty: the tiny CLIP vision model; else a local
  # transformers CLIPVisionModel directory (model.safetensors, preprocessor config).
  config.vision_encoder = ''
  config.allow_pickle = False  # refuse torch .bin weights unless set
  config.resolution = 32 if runlocal else 512  # pixels; latents: resolution / vae factor

  # ---- Model: the adapter on top of the frozen UNet ----
  config.model = ml_collections.ConfigDict()
  config.model.scoring_hidden = 0  # width of the two score-net MLPs; 0 = image feature width
  config.model.fusion = 'timestep'  # Eq. 8; 'text', 'visual', 'mean' for Table 3 ablations
  # Eq. 6 at inference: 'paper' pools every latent position of M-hat * z_t (the zeroed
  # ones too), 'scope' only those inside the influence scope.
  config.model.visual_pool = 'paper'
  # How the fused scores become S (Eqs. 8-9): 'softmax' (the paper) or 'sigmoid' (each
  # token's own S, whose gradient does not vanish when one token dominates).
  config.model.score_normalization = 'softmax'
  # 'adaptive' (Eqs. 5-10) | 'none' (Table 3 ID-2: every image token, no scores, no top-k)
  config.model.scoring = 'adaptive'
  # 'torch': the numerics SD checkpoints were trained with (exact GELU in GEGLU, GroupNorm
  # eps 1e-6 in the transformer blocks); 'diffusers_flax': diffusers' Flax UNet's.
  config.model.numerics = 'torch'
  config.model.dtype = 'float32' if runlocal else 'bfloat16'  # frozen UNet compute
  # Attention kernels: 'auto' (per layer: cuDNN flash attention on NVIDIA GPUs in
  # bf16/fp16, the Pallas flash kernel on TPUs, XLA elsewhere) | 'xla' | 'cudnn' | 'pallas'.
  config.model.attention_impl = 'auto'
  # With a fused kernel, the T2I word maps of Eq. 11 come out of the text kernel itself;
  # False computes their rows' probabilities through XLA beside it (a before/after switch).
  config.model.fused_word_maps = True
  # Torch resizes the mask without antialiasing; jax.image.resize antialiases when it
  # downsamples unless told not to. False follows the authors (see README).
  config.model.mask_antialias = False
  # Transformer-block remat in training: 'none' | 'dots' (keep the matmul outputs,
  # recompute the rest) | 'full' (recompute everything; least memory).
  config.model.remat = 'none' if runlocal else 'dots'

  # ---- Tiny random models (used when `pretrained` is empty) ----
  config.tiny = ml_collections.ConfigDict()
  config.tiny.unet = dict(
      sample_size=8, in_channels=4, out_channels=4,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
      block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
      cross_attention_dim=32, use_linear_projection=False)
  # VAE factor 4 (three blocks) maps resolution 32 px to the UNet's 8 x 8 latents.
  config.tiny.vae = dict(block_out_channels=(32, 32, 32), layers_per_block=1,
                         latent_channels=4)
  config.tiny.text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=77)
  config.tiny.vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=2, image_size=32, patch_size=8)

  # ---- Sampling (Sec. 4.1) ----
  config.sampler = ml_collections.ConfigDict()
  config.sampler.num_steps = 10 if runlocal else 50  # DDIM 50 steps (Sec. 4.1)
  config.sampler.guidance_text = 7.5  # w_t in Eq. 13
  config.sampler.guidance_image = 12.5  # w_i in Eq. 13
  config.sampler.gamma_scope = 0.25  # Eq. 11
  config.sampler.gamma_num = 0.8  # Eq. 10 at inference
  config.sampler.binary_mask = False  # Table 2 "binary" ablation

  # ---- Training data (train/input_pipeline.py) ----
  config.data = common.data_config()  # runlocal: the generated toy shards
  if not runlocal:
    config.data.toy = False
    config.data.toy_num_images = 0
    config.data.shards_dir = ''  # required: img2dataset webdataset shards
    config.data.min_aesthetic = 5.0  # aesthetic-score filter of LAION-5B (Sec. 4.1)
    config.data.batch_size = 256  # global (assumed; the paper does not state it)
    config.data.worker_count = 8
    # True: encoders once, before training (README "Precomputed features"); prepare them
    # with `python -m train.prepare ... --config.data.precompute_features=True`.
    config.data.precompute_features = False

  # ---- Training (train/train.py, Sec. 3.2) ----
  config.adapter = ''  # trained adapter (.safetensors) for sampling / evaluation
  config.train = common.train_config()
  config.train.gamma_num_range = (0.3, 1.0)  # Eq. 10, drawn per sample
  config.train.image_dropout = 0.1  # rows trained without the subject (for Eq. 13's branches)
  # 'none': Eq. 10's top-k has no gradient (the paper: the score nets learn through Eq.
  # 9's gain only); 'straight_through': the selection enters the visual attention as
  # 0 / 1 weights whose gradient reaches the score nets (our option, the einsum path).
  config.train.selection_gradient = 'none'
  # 'none': the paper (the score nets learn through Eq. 9's gain only); 'word_map': also
  # a cross-entropy pulling the fused scores towards the frozen base's cross-attention
  # map of the caption's subject word (our option; `subject_words` lists the caption
  # words that name subjects, each one token; needs subject_reference 'self').
  config.train.score_supervision = 'none'
  config.train.score_supervision_weight = 0.1
  config.train.subject_words = ()
  if not runlocal:
    config.train.num_steps = 160_000  # "16w iterations"
    config.train.learning_rate = 1e-4
    config.train.warmup_steps = 1000
    config.train.frozen_dtype = 'bfloat16'
    config.train.checkpoint_every = 1000
    config.train.max_to_keep = 3
    config.train.log_every = 50

  config.mesh = common.mesh_config()
  config.eval = common.eval_config()
  if not runlocal:
    config.eval.images_per_prompt = 4
  return config
