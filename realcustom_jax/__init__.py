"""RealCustom (CVPR 2024) in JAX/Flax."""
