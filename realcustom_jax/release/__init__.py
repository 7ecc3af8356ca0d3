"""The authors' release (github.com/bytedance/RealCustom, SDXL), ported: its checkpoint
conversion, SigLIP + DINOv2 subject encoder, ViTs, SDXL text encoding, pipeline, settings
and a tiny random stand-in. An add-on: it imports the core (`realcustom_jax`), the core
never imports it."""
