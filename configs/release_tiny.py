"""The release pipeline (configs/release.py) on tiny random weights, on a CPU.

Nothing is downloaded: the first run writes a tiny SDXL directory, the two timm ViT
folders and a release-style .pth (with torch), converts the .pth with the converter
users run on RealCustom_highres.pth (`realcustom_jax.release.tiny`), then loads all of
it as it loads the real files. Later runs reuse the written files (a cache directory,
or --config.tiny_release.dir).

  python -m sample.main --config=configs/release_tiny.py --subject=toy.png \\
      --prompt="a toy on the beach" --word=toy --out=out.png --mask_grid=grid.png
  python -m sample.evaluate --config=configs/release_tiny.py --bench_dir=dreambench \\
      --out_dir=/tmp/eval_release_tiny
"""
from configs import release


def get_config():
  config = release.get_config()
  # Written once there ('' = ~/.cache/realcustom_jax/release_tiny/<sizes hash>); the
  # other keys size the two ViTs (both alike) and the projector's heads.
  config.tiny_release = dict(dir='', image_size=28, embed_dim=32, depth=2, num_heads=2,
                             layers=(1,), dim_head=16, seed=0)
  config.height = 64  # the tiny SDXL: VAE factor 2, UNet downsampling 4, half-latent mask
  config.width = 48
  config.vision.image_size = 28  # views of 28 px (2 x 2 patches), reference 56 px
  config.vision.siglip_layers = (1,)
  config.vision.dino_layers = (1,)
  config.model.dtype = 'float32'
  config.sampler.num_steps = 4
  config.sampler.mask_reused_step = 2
  return config
