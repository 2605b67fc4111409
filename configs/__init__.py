"""Recipes: `get_config(variant) -> ml_collections.ConfigDict`, one module per recipe."""
