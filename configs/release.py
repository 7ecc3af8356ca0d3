"""The authors' released RealCustom (SDXL, RealCustom_highres.pth) with their settings.

  # once: convert the release's .pth (needs torch)
  python -m sample.convert_release --checkpoint=RealCustom_highres.pth \\
      --out=realcustom_highres.safetensors --allow_pickle
  python -m sample.main --config=configs/release.py --pretrained=/models/sdxl-base-1.0 \\
      --vision_encoder=/models/realcustom_vision --adapter=realcustom_highres.safetensors \\
      --subject=dog.jpg --prompt="This dog is wearing a spacesuit in space" --word=dog \\
      --out=out.png --mask_grid=masks.png
  python -m sample.evaluate --config=configs/release.py --config.pretrained=... \\
      --config.vision_encoder=... --config.adapter=... --bench_dir=dreambench \\
      --out_dir=eval_release

Every default is the release's (github.com/bytedance/RealCustom at 28a718e,
`inference/pipeline.py`, `inference/inference_single_image.py` and its .sh); where
they disagree the .sh script the README runs wins, as noted per key. configs/
release_tiny.py runs the same pipeline on tiny random weights.
"""
import ml_collections

from configs import common
from realcustom_jax.release import defaults as rd  # import-free: no JAX at config load


def get_config():
  config = ml_collections.ConfigDict()
  config.pipeline = 'release'  # pipelines.load_pipeline builds the release pipeline
  config.seed = 0
  # A diffusers-format SDXL base 1.0 directory (unet/, vae/, text_encoder/,
  # text_encoder_2/, tokenizer/, tokenizer_2/).
  config.pretrained = ''
  # A directory holding the timm hub folders vit_so400m_patch14_siglip_384/ and
  # vit_large_patch14_reg4_dinov2.lvd142m/.
  config.vision_encoder = ''
  config.adapter = ''  # python -m sample.convert_release output (.safetensors)
  config.allow_pickle = False  # refuse torch .bin SDXL weights unless set
  # inference_single_image.sh: HEIGHT=768, WIDTH=1024 (landscape). pipeline.py and the
  # Gradio demo default to 1024 x 1024. Multiples of 32 px (see realcustom_jax.release.convert).
  config.height = rd.HEIGHT
  config.width = rd.WIDTH
  # prompts/validation_negative.txt, read by both scripts.
  config.negative_prompt = rd.NEGATIVE_PROMPT

  # ---- Subject encoder (configs/realcustom_sigdino_highres.json) ----
  config.vision = ml_collections.ConfigDict()
  config.vision.image_size = 384  # each view; the reference is patchify_scale x 384 = 768 px
  config.vision.siglip_layers = (25,)
  config.vision.dino_layers = (22,)
  config.vision.patchify_scale = 2

  # ---- Model ----
  config.model = ml_collections.ConfigDict()
  # The release runs in bfloat16 (pipeline.py model_type='bf16'); float32 on CPU.
  config.model.dtype = 'bfloat16'
  config.model.attention_impl = 'auto'  # fused kernels where they apply, see configs/tiny.py
  config.model.remat = 'none'

  # ---- Sampling ----
  config.sampler = ml_collections.ConfigDict()
  config.sampler.num_steps = rd.NUM_STEPS  # 25, both scripts
  # The release's default scheduler (pipeline.py and the argparse default 'dpm'): single-
  # step DPM-Solver++ order 2 on 'trailing' timesteps; 'ddim' for its --scheduler_type ddim.
  config.sampler.solver = rd.SOLVER  # 'dpm_solver_2s'
  # The release's guidance, eps_neg + w (eps_subject - eps_neg), is its family's loop
  # (realcustom_jax.release.sampler); w: 3.5 in pipeline.py, the demo and the .sh (the argparse default 7.5 is overridden).
  config.sampler.guidance_image = rd.GUIDANCE  # 3.5
  # mask_scope: 0.25 in pipeline.py and both .sh (argparse and the demo slider: 0.2).
  config.sampler.gamma_scope = rd.MASK_SCOPE  # 0.25
  # --mask_strategy: 'max_norm' in both .sh and argparse (pipeline.py: min_max_per_channel).
  config.sampler.mask_strategy = rd.MASK_STRATEGY  # ('max_norm',)
  # Steps from 12 on reuse step 11's mask (pipeline.py, argparse, the batch .sh; the
  # single-image .sh sets 99: never).
  config.sampler.mask_reused_step = rd.MASK_REUSED_STEP  # 12

  # ---- DreamBench evaluation (sample/evaluate.py) ----
  config.eval = common.eval_config()
  return config
