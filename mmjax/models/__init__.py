"""Architectures, one file per piece: vit, lm, bert, perceiver, xattn, flamingo."""
