"""Static-shape top-k by a traced ratio, shared by Eq. 10 and Eq. 11, plus input checks."""
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# A float32 ratio such as 0.7 is 0.69999998; without the slack, floor(0.7 * 10) = 6.
_RATIO_SLACK = 1e-3


def num_selected(ratio, n: int) -> Array:
  """k = floor(ratio * n) (with a small slack for float32 rounding), as an int32 array."""
  return jnp.floor(jnp.asarray(ratio, jnp.float32) * n + _RATIO_SLACK).astype(jnp.int32)


def top_fraction_mask(scores: Array, ratio) -> Array:
  """True at the floor(ratio * n) highest scores along the last axis.

  Keeps static shapes whatever the ratio: a traced ratio selects a different count
  without recompiling. Ties are broken by position, so exactly k entries are True.

  Args:
    scores: (..., n) scores.
    ratio: scalar or (...,) ratio in [0, 1], Python or traced.

  Returns:
    (..., n) bool mask.
  """
  n = scores.shape[-1]
  k = num_selected(ratio, n)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  # Mark the first k positions of the sorted order and scatter the marks back: one
  # sort instead of the two a rank-by-argsort needs.
  in_top = jnp.arange(n) < jnp.expand_dims(k, -1)
  in_top = jnp.broadcast_to(in_top, scores.shape)
  flat_order = order.reshape(-1, n)
  rows = jnp.arange(flat_order.shape[0])[:, None]
  mask = jnp.zeros(flat_order.shape, bool).at[rows, flat_order].set(in_top.reshape(-1, n))
  return mask.reshape(scores.shape)


def check_unit_interval(name: str, value) -> None:
  """Raises ValueError when a concrete ratio lies outside [0, 1]; tracers pass.

  Called before tracing, so a user mistake is a clear error instead of a silently
  empty or full selection.
  """
  try:
    values = np.asarray(value, dtype=np.float64)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return  # traced: checked by the caller's concrete inputs, if anywhere
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be a number in [0, 1], got {value!r}') from None
  if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
    raise ValueError(f'{name} must lie in [0, 1], got {value!r}')
