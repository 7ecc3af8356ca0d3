"""Running the library: device meshes and sharding, multi-process start-up, the CLIs'
shared flag and error handling."""
