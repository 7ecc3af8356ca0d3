"""Two tiny UNet configs in diffusers' format: SD1-like and SD2-like."""

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
