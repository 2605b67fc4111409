"""Architectures, one file per piece: vit, lm, perceiver, xattn, flamingo."""
