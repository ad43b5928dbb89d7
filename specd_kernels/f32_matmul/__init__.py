"""specd_kernels/f32_matmul: fp32 linear layers for few rows, weight-stationary: `cpu.c` (AVX-512 or AVX2),
its packing and call in `cpu.py`, and `ref.py`, the torch it is tested against."""
