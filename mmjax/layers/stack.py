"""Layer stacks: rematerialisation by named policy, and scanning over repeated layers.

Rematerialisation (gradient checkpointing): a policy says which intermediate values of a
layer's forward pass are kept for the backward pass; the rest are recomputed. Less memory
for more compute:

  none           keep everything (no remat).
  minimal        keep the outputs of matmuls with weights (projections, feed-forward),
                 recompute attention scores, norms and activations.
  save_qkv_proj  keep only the query/key/value projections.
  full           keep nothing but the layer's input; recompute the whole layer.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

REMAT_POLICIES = {
    "none": None,
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj"),
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat(layer: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()
          ) -> type[nn.Module]:
  """`layer` rematerialised under the named `policy` ("none" returns it unchanged).

  Parameters keep their names and shapes, so checkpoints do not depend on the policy.
  `static_argnums` index the call's positional arguments, `self` being 0.
  """
  if policy not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {policy!r}; choose one of {sorted(REMAT_POLICIES)}.")
  if policy == "none":
    return layer
  return nn.remat(layer, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


def scan(layer: nn.Module, length: int, carry: Any,
         call: Callable[[nn.Module, Any], Any] = lambda module, carry: module(carry)) -> Any:
  """Applies `length` copies of `layer` in sequence, `carry -> call(copy, carry)`, as one
  `jax.lax.scan`: the layer is traced and compiled once, whatever the depth.

  The copies' parameters (and decoding caches) are stacked along a new leading axis with
  the logical name "layers", under `layer`'s name; `mmjax.checkpoints.match_layout`
  converts between this layout and one entry per layer (`<name>_<i>`). Values `call`
  closes over (masks, positions) are the same for every copy.
  """
  def body(module, carry, _):
    return call(module, carry), None

  scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0},
                    split_rngs={"params": True}, length=length,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(layer, carry, None)[0]


def stack(make: Callable[[str], nn.Module], length: int, carry: Any, *, scanned: bool,
          call: Callable[[nn.Module, Any], Any] = lambda module, carry: module(carry)) -> Any:
  """`length` layers in sequence, each `make(name)`: one scanned layer named "layers"
  (`scan`) when `scanned`, else `layers_0`, `layers_1`, ... one after the other."""
  if scanned and length:
    return scan(make("layers"), length, carry, call)
  for i in range(length):
    carry = call(make(f"layers_{i}"), carry)
  return carry
