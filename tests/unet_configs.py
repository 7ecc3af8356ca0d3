"""Tiny UNet configs in diffusers' format: SD1-like, SD2-like, SDXL-like; full SDXL base."""
from realcustom_jax.release import tiny_sdxl

SD1_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
    cross_attention_dim=32, use_linear_projection=False)

# SD2: linear projections, per-block head counts, three resolutions, 2 layers per block.
SD2_LIKE = dict(
    sample_size=8, in_channels=4, out_channels=4,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(1, 2, 2),
    cross_attention_dim=48, use_linear_projection=True)

# SDXL at toy size (no attention in the first block, deeper transformers further down,
# linear projections, 'text_time' added conditioning over a 20-wide pooled embedding plus
# 6 time ids of 8 sinusoidal features each; SDXL: 1280 + 6 * 256 = 2816): the UNet of
# the tiny SDXL directory, so the parity tests and the loader tests share it.
SDXL_LIKE = tiny_sdxl.SDXL_UNET
SDXL_POOLED_DIM = 20

# The full-size SDXL base UNet config (stabilityai/stable-diffusion-xl-base-1.0, the one
# the RealCustom release ships in configs/realcustom_sigdino_highres.json), every key
# diffusers writes. Too big to instantiate in tests; its structure is checked instead.
SDXL_BASE = dict(
    act_fn='silu', addition_embed_type='text_time', addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280], center_input_sample=False, class_embed_type=None,
    class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
    cross_attention_dim=2048, cross_attention_norm=None,
    down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'],
    downsample_padding=1, dual_cross_attention=False, encoder_hid_dim=None,
    encoder_hid_dim_type=None, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_only_cross_attention=None, mid_block_scale_factor=1,
    mid_block_type='UNetMidBlock2DCrossAttn', norm_eps=1e-05, norm_num_groups=32,
    num_attention_heads=None, num_class_embeds=None, only_cross_attention=False,
    out_channels=4, projection_class_embeddings_input_dim=2816, resnet_out_scale_factor=1.0,
    resnet_skip_time_act=False, resnet_time_scale_shift='default', sample_size=128,
    time_cond_proj_dim=None, time_embedding_act_fn=None, time_embedding_dim=None,
    time_embedding_type='positional', timestep_post_act=None,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=['CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
    upcast_attention=False, use_linear_projection=True)
