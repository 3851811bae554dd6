"""ftcore plugin `liger`: Liger kernels (fused norms, RoPE, SwiGLU, fused linear cross-entropy) for ftcore."""
