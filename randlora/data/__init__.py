"""Data modules: image classification (bundled digits, synthetic, HF datasets, image folders) and
instruction data for causal LMs."""
