"""ftcore plugin `scattermoe`: ScatterMoE Triton expert kernels with LoRA on experts for ftcore."""
