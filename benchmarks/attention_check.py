"""The fused attention kernels against the einsum path on the accelerator at hand.

  python -m benchmarks.attention_check [--impl=auto]

Runs `attention.fused_attention` with the kernel `--impl` resolves to (cuDNN on an NVIDIA
GPU, Pallas on a TPU) in bfloat16 at SD 1.5's attention shapes (self-attention at the
64x64 / 32x32 / 16x16 levels with head widths 40 / 80 / 160; text cross-attention over
77 tokens; the visual attention over 256 image tokens with a top-k key mask) and
compares the output and the gradients of q, k and v with the einsum path computed in
float32 from the same bfloat16 inputs. Prints one JSON line per shape, the last line
being the summary; exits 1 if an error exceeds the bfloat16 tolerance.
"""
import json
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from realcustom_jax import attention

_IMPL = flags.DEFINE_enum('impl', 'auto', list(attention.ATTENTION_IMPLS),
                          'Kernel to check (auto: the one a bf16 layer would take here).')
_BATCH = flags.DEFINE_integer('batch', 2, 'Batch size.')
_HEADS = 8
# (name, query length, key length, head width, top-k masked keys)
_SHAPES = (('self_64x64', 4096, 4096, 40, False), ('self_32x32', 1024, 1024, 80, False),
           ('self_16x16', 256, 256, 160, False), ('text_64x64', 4096, 77, 40, False),
           ('visual_64x64', 4096, 256, 40, True), ('visual_16x16', 256, 256, 160, True))
# bf16 keeps 8 bits of mantissa: errors relative to the largest reference value.
_TOLERANCE = 2e-2


def _reference(q, k, v, key_mask):
  heads_second = lambda x: x.astype(jnp.float32).transpose(0, 2, 1, 3)
  out = attention.visual_cross_attention(heads_second(q), heads_second(k), heads_second(v),
                                         key_mask)
  return out.transpose(0, 2, 1, 3)


def check(name: str, t: int, s: int, d: int, masked: bool, requested: str, b: int) -> dict:
  impl = attention.layer_attention_impl(requested, d, t, jnp.bfloat16)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  q, k, v = (jax.random.normal(key, (b, n, _HEADS, d), jnp.bfloat16)
             for key, n in zip(keys, (t, s, s)))
  key_mask = None
  if masked:  # 80% of the tokens, unordered, and no token at all in the last row
    key_mask = (jax.random.uniform(keys[3], (b, s)) < 0.8).at[-1].set(False)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2)
  fused = lambda q, k, v: attention.fused_attention(q, k, v, impl, key_mask)
  reference = lambda q, k, v: _reference(q, k, v, key_mask)
  got = jax.jit(jax.value_and_grad(loss(fused), argnums=(0, 1, 2)))
  want = jax.jit(jax.value_and_grad(loss(reference), argnums=(0, 1, 2)))
  out, ref = jax.jit(fused)(q, k, v), jax.jit(reference)(q, k, v)
  (_, grads), (_, ref_grads) = got(q, k, v), want(q, k, v)
  rel = lambda a, r: float(jnp.max(jnp.abs(a.astype(jnp.float32) - r)) /
                           (jnp.max(jnp.abs(r)) + 1e-12))
  errors = {'out': rel(out, ref)}
  errors.update({f'grad_{n}': rel(g, r) for n, g, r in zip('qkv', grads, ref_grads)})
  finite = bool(jnp.isfinite(out.astype(jnp.float32)).all())
  return dict(check=name, impl=impl, q_len=t, kv_len=s, head_dim=d, masked=masked,
              finite=finite, ok=finite and max(errors.values()) < _TOLERANCE,
              **{k: round(e, 5) for k, e in errors.items()})


def main(argv):
  del argv
  results = []
  for shape in _SHAPES:
    r = check(*shape, _IMPL.value, _BATCH.value)
    print(json.dumps(r), flush=True)
    results.append(r)
  summary = dict(benchmark='attention_check', device_kind=jax.devices()[0].device_kind,
                 all_ok=all(r['ok'] for r in results),
                 impls=sorted({r['impl'] for r in results}),
                 worst=max(max(v for k, v in r.items() if k == 'out' or k.startswith('grad'))
                           for r in results))
  print(json.dumps(summary), flush=True)
  sys.exit(0 if summary['all_ok'] else 1)


if __name__ == '__main__':
  app.run(main)
