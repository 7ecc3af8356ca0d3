"""The toy world: RealCustom's claim measured end to end on a CPU, from scratch (README.md)."""
