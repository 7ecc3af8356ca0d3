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
  config.model.dtype = 'float32'  # compute dtype of the frozen UNet ('bfloat16' on accelerators)
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
  config.model.remat = 'none'

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
  config.sampler.num_steps = 10  # the paper uses 50 (configs/laion.py)
  config.sampler.guidance_text = 7.5  # w_t in Eq. 13
  config.sampler.guidance_image = 12.5  # w_i in Eq. 13
  config.sampler.gamma_scope = 0.25  # Eq. 11
  config.sampler.gamma_num = 0.8  # Eq. 10 at inference
  config.sampler.binary_mask = False  # Table 2 "binary" ablation

  # ---- Training data (train/input_pipeline.py) ----
  config.data = ml_collections.ConfigDict()
  config.data.toy = True  # generate coloured-shape shards instead of reading LAION
  config.data.toy_num_images = 256
  config.data.shards_dir = ''  # img2dataset webdataset shards (.tar); unused when toy
  config.data.tfds_data_dir = ''  # '' = <workdir>/tfds
  config.data.aesthetic_field = 'aesthetic'  # key in each sample's .json
  config.data.min_aesthetic = 0.0  # <= 0 disables the filter
  # The subject image the adapter reads in training: 'self' (the paper: the training
  # image itself) or 'stored' (each sample's `KEY.ref.<ext>` in the shards: the same
  # subject in another scene, so the reference's context stops predicting the target's).
  config.data.subject_reference = 'self'
  config.data.batch_size = 4  # global, across all processes
  config.data.shuffle_seed = 0
  config.data.worker_count = 0  # grain worker processes
  # True: run the frozen VAE / CLIP encoders once over the prepared set and train on their
  # stored outputs (train/precompute.py): faster steps, no encoders on the devices, for
  # disk (0.71 MB per 512 px image at SD 1.5 + ViT-L/14 in float16, several JPEGs' worth).
  # Rerunning reuses the stored features; changed encoders or settings prepare new ones.
  config.data.precompute_features = False
  config.data.feature_dtype = 'float16'  # stored features: 'float16' | 'bfloat16' | 'float32'

  # ---- Training (train/train.py, Sec. 3.2) ----
  config.adapter = ''  # trained adapter (.safetensors) for sampling / evaluation
  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 20
  config.train.learning_rate = 1e-4
  config.train.weight_decay = 0.01  # AdamW
  config.train.adam_b1 = 0.9
  config.train.adam_b2 = 0.999
  config.train.warmup_steps = 0
  config.train.grad_clip_norm = 0.0  # 0 = no clipping
  config.train.gamma_num_range = (0.3, 1.0)  # Eq. 10, drawn per sample
  config.train.image_dropout = 0.1  # rows trained without the subject (for Eq. 13's branches)
  # 'none': Eq. 10's top-k has no gradient (the paper: the score nets learn through Eq.
  # 9's gain only); 'straight_through': the selection enters the visual attention as
  # 0 / 1 weights whose gradient reaches the score nets (our option, the einsum path).
  config.train.selection_gradient = 'none'
  # A checkpoint that does not restore (truncated file, corrupt metadata): 'fall_back'
  # sets it aside as STEP.damaged and resumes from the newest one that restores;
  # 'stop' ends the run with one line instead.
  config.train.on_damaged_checkpoint = 'fall_back'
  # 'zero_v': to_v_visual starts at zero, so the visual branch starts silent; 'copy_text':
  # both visual K/V copied from the text K/V (IP-Adapter). realcustom_jax/adapter.py says
  # why zero is the default (measured on the toy base).
  config.train.visual_kv_init = 'zero_v'
  config.train.frozen_dtype = 'float32'  # storage dtype of the frozen UNet / VAE / CLIP
  config.train.checkpoint_every = 10
  config.train.max_to_keep = 3
  config.train.log_every = 1
  config.train.debug_nan_step = -1  # >= 0: feed NaN images at that step (tests the guard)

  # ---- Devices ----
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # -1: all devices not used by the other axis
  config.mesh.fsdp = 1
  config.mesh.distributed = False  # jax.distributed.initialize() (pods, multi-host GPU)

  config.eval = eval_config()
  return config


def eval_config() -> ml_collections.ConfigDict:
  """DreamBench evaluation (sample/evaluate.py); configs/release.py shares it."""
  ev = ml_collections.ConfigDict()
  ev.clip_model = ''  # CLIP ViT-B/32 dir; '' = tiny random (scores meaningless)
  ev.dino_model = ''  # DINO ViT-S/16 dir; '' = tiny random
  ev.images_per_prompt = 1
  ev.subject_image_index = 0
  ev.prompt_limit = 0  # 0 = all prompts
  ev.seed = 0
  return ev
