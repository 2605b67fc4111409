"""mmjax: multimodal vision-language pretraining in JAX/Flax.

`mmjax.load(path)` gives a trained model ready to caption, answer, chat and generate
(`mmjax.inference`; `python -m mmjax.chat` chats with a LLaVA in the terminal); importing
`mmjax` itself imports nothing heavy.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
  # `load` is imported on first use, so that `import mmjax` stays free of JAX.
  if name == "load":
    from mmjax.inference import load
    return load
  raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
