"""The work between a decoder layer's int8 matmuls on the CPU, one C call per gap (`cpu.c`); driven by
engine/models/int8_layers.py. No reference of its own: it is the layer-by-op path
(engine/models/llama.py with specd_kernels/rowscale, rope and attention) fused, and is tested against it."""
