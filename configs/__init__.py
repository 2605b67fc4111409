"""Recipes: `get_config(variant) -> ml_collections.ConfigDict`, one module per recipe."""

from mmjax.cli import UserError


def method_and_shape(arg: str | None, recipe: str, methods, shapes, default_method: str
                     ) -> tuple[str, str]:
  """`(method, shape)` of a variant `<method>`, `<shape>` or `<method>-<shape>` of
  `configs/<recipe>.py` (the first shape is the default); an unknown one is a UserError
  naming the choices."""
  method, _, shape = (arg or "").partition("-")
  if method in shapes and not shape:
    method, shape = "", method
  method, shape = method or default_method, shape or shapes[0]
  if method not in methods or shape not in shapes:
    raise UserError(f"Unknown {recipe} variant {arg!r}; choose a method of {tuple(methods)}, "
                    f"a shape of {tuple(shapes)}, or <method>-<shape> "
                    f"(--config=configs/{recipe}.py:<variant>).")
  return method, shape
