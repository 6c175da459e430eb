"""Layers acting on 5-D (N, C, H, W, T) tensors: conv, linear, pooling, dropout."""
