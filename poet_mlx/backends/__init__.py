"""Fast paths for MLX's CPU backend on Linux: OpenBLAS for matmuls, dequantize-then-GEMM for 4-bit layers."""
