"""The fused attention kernels against the einsum path on the accelerator at hand.

  python -m benchmarks.attention_check [--impl=auto]

Runs `kernels.fused_attention` with the kernel `--impl` resolves to (cuDNN on an NVIDIA
GPU, Pallas on a TPU) in bfloat16 at SD 1.5's attention shapes (self-attention at the
64x64 / 32x32 / 16x16 levels with head widths 40 / 80 / 160; text cross-attention over
77 tokens; the visual attention over 256 image tokens with a top-k key mask) and
compares the output and the gradients of q, k and v with the einsum path computed in
float32 from the same bfloat16 inputs. Then the sampler's word maps out of the fused text
kernel (`kernels.fused_attention_with_word_maps`, heads widened by the word column to
48 / 88 / 168) against the float32 probabilities, with the output beside them. Prints
one JSON line per check, the last line being the summary; exits 1 if an error exceeds
the bfloat16 tolerance.
"""
import json
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from realcustom_jax import attention
from realcustom_jax import kernels

_IMPL = flags.DEFINE_enum('impl', 'auto', list(kernels.ATTENTION_IMPLS),
                          'Kernel to check (auto: the one a bf16 layer would take here).')
_BATCH = flags.DEFINE_integer('batch', 2, 'Batch size.')
_HEADS = 8
# (name, query length, key length, head width, top-k masked keys)
_SHAPES = (('self_64x64', 4096, 4096, 40, False), ('self_32x32', 1024, 1024, 80, False),
           ('self_16x16', 256, 256, 160, False), ('text_64x64', 4096, 77, 40, False),
           ('visual_64x64', 4096, 256, 40, True), ('visual_16x16', 256, 256, 160, True))
# (name, query length, head width) of the text attention whose word maps are checked.
_WORD_MAP_SHAPES = (('word_maps_64x64', 4096, 40), ('word_maps_32x32', 1024, 80),
                    ('word_maps_16x16', 256, 160))
# bf16 keeps 8 bits of mantissa: errors relative to the largest reference value.
_TOLERANCE = 2e-2


def _reference(q, k, v, key_mask):
  heads_second = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)
  out = attention.visual_cross_attention(heads_second(q), heads_second(k), heads_second(v),
                                         key_mask)
  return out.transpose(0, 2, 1, 3)


def check(name: str, t: int, s: int, d: int, masked: bool, requested: str, b: int) -> dict:
  impl = kernels.layer_attention_impl(requested, d, t, jnp.bfloat16)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (b, n, _HEADS, d), jnp.bfloat16)
             for key, n in zip(keys, (t, s, s)))
  key_mask = None
  if masked:  # 80% of the tokens, unordered, and no token at all in the last row
    key_mask = (jax.random.uniform(keys[3], (b, s)) < 0.8).at[-1].set(False)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)
  fused = lambda q, k, v: kernels.fused_attention(q, k, v, impl, key_mask)
  reference = lambda q, k, v: _reference(q, k, v, key_mask)
  got = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1, 2)))
  want = jax.jit(jax.value_and_grad(loss(reference), argnums=(0, 1, 2)))
  out, ref = jax.jit(fused)(q, k, v), jax.jit(reference)(q, k, v)
  (_, grads), (_, ref_grads) = got(q, k, v), want(q, k, v)
  errors = {'out': _relative(out, ref)}
  errors.update({f'grad_{n}': _relative(g, r) for n, g, r in zip('qkv', grads, ref_grads)})
  finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
  return dict(check=name, impl=impl, q_len=t, kv_len=s, head_dim=d, masked=masked,
              finite=finite, ok=finite and max(errors.values()) < _TOLERANCE,
              **{k: round(e, 5) for k, e in errors.items()})


def _relative(a, r) -> float:
  return float(jnp.max(jnp.abs(a.astype(jnp.float32) - r)) / (jnp.max(jnp.abs(r)) + 1e-12))


def check_word_maps(name: str, t: int, d: int, requested: str, b: int) -> dict:
  """The [uncond, T2I] text call: output of all rows, word maps of the last half."""
  impl = kernels.layer_attention_impl(requested, d, t, jnp.bfloat16)
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q, k, v = (jax.random.normal(key, (2 * b, n, _HEADS, d), jnp.bfloat16)
             for key, n in zip(keys, (t, 77, 77)))
  # A two-token word at 5-6 and a repeated one at 9: several columns per row.
  words = jnp.zeros((b, 77)).at[:, 5:7].set(1.0).at[-1, 9].set(1.0)
  fused = jax.jit(lambda q, k, v: kernels.fused_attention_with_word_maps(
      q, k, v, words, impl))
  out, maps = fused(q, k, v)
  heads_second = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)
  ref_out, probs = attention.text_cross_attention(*(heads_second(x) for x in (q, k, v)))
  ref_maps = attention.word_attention_map(probs[-b:], words, t, 1)[..., 0]
  errors = {'out': _relative(out, ref_out.transpose(0, 2, 1, 3)),
            'word_maps': _relative(maps, ref_maps)}
  finite = bool(jnp.isfinite(maps).all() and jnp.isfinite(out.astype(jnp.float32)).all())
  return dict(check=name, impl=impl, q_len=t, kv_len=77, head_dim=d, finite=finite,
              ok=finite and max(errors.values()) < _TOLERANCE,
              **{k: round(e, 5) for k, e in errors.items()})


def main(argv):
  del argv
  results = []
  for shape in _SHAPES:
    r = check(*shape, _IMPL.value, _BATCH.value)
    print(json.dumps(r), flush=True)
    results.append(r)
  for shape in _WORD_MAP_SHAPES:
    r = check_word_maps(*shape, _IMPL.value, _BATCH.value)
    print(json.dumps(r), flush=True)
    results.append(r)
  summary = dict(benchmark='attention_check', device_kind=jax.devices()[0].device_kind,
                 all_ok=all(r['ok'] for r in results),
                 impls=sorted({r['impl'] for r in results}),
                 worst=max(max(v for k, v in r.items()
                               if k in ('out', 'word_maps') or k.startswith('grad'))
                           for r in results))
  print(json.dumps(summary), flush=True)
  sys.exit(0 if summary['all_ok'] else 1)


if __name__ == '__main__':
  app.run(main)
