"""Where a profiled step spends its time: device time per XLA op kind, from a JAX trace.

  python -m benchmarks.train_step --arch=sd15 --dtype=bfloat16 --profile_dir=/tmp/prof
  python -m benchmarks.trace_summary /tmp/prof [--top=25] [--by=kind|op|kernel|category] \
      [--module=jit_step]

Reads the newest `perfetto_trace.json.gz` under the directory (what
`jax.profiler.trace(..., create_perfetto_trace=True)` writes), keeps the events that
carry an XLA op (`hlo_op`; on a GPU these are the kernels), groups them by op kind (the
op name without its numeric suffix: `loop_multiply_fusion.12` -> `loop_multiply_fusion`)
and prints a table, largest first, then one JSON line with the same figures. On a GPU,
XLA runs most of a step as command buffers (CUDA graphs) whose kernels all carry the
buffer's name as their op: `--by=kernel` groups by the kernel's own name instead, and
`--by=category` sorts kernels into attention / convolution / matmul / fused elementwise
/ other (the README's op breakdown).

Shares are of the summed op time, which on a GPU is the busy time of its streams and
on a CPU can exceed wall time (ops run on several threads).
"""
import collections
import glob
import gzip
import json
import os
import re
import sys

from absl import app
from absl import flags

_TOP = flags.DEFINE_integer('top', 25, 'Op kinds to list.')
_BY = flags.DEFINE_enum('by', 'kind', ['kind', 'op', 'kernel', 'category'],
                        'Group by op kind, single op, kernel name or kernel category.')
_MODULE = flags.DEFINE_string('module', 'jit_step', 'Keep ops of XLA modules whose name '
                              'contains this ("" keeps all).')


def newest_trace(directory: str) -> str:
  """The newest perfetto_trace.json.gz under `directory`; ValueError if none."""
  found = glob.glob(os.path.join(directory, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not found:
    raise ValueError(f'no perfetto_trace.json.gz under {directory}')
  return max(found, key=os.path.getmtime)


def op_kind(name: str) -> str:
  """`fusion.12` -> `fusion`; names without a numeric suffix are kept."""
  return re.sub(r'(\.\d+)+$', '', name)


# Kernel categories: the first pattern that matches the kernel's or its op's name (lower
# case). cuDNN's attention graphs include helper kernels named cudnn::fusion::...; a
# `loop_convert_fusion` is a dtype cast, not a convolution.
CATEGORIES = (
    ('attention', r'sdpa|fmha|flash|cudnn::fusion'),
    ('convolution', r'implicit_gemm|dgrad|wgrad|fprop|cudnn-conv|convolution'),
    ('matmul', r'gemm|nvjet|xmma|cutlass|cublas|\bdot'),
    ('fused elementwise / reduction', r'fusion|reduce|transpose|copy|slice|concatenate'),
)


def category(kernel: str, op: str) -> str:
  """One of CATEGORIES' names, or 'other'."""
  names = f'{kernel} {op}'.lower()
  for name, pattern in CATEGORIES:
    if re.search(pattern, names):
      return name
  return 'other'


def _group(e: dict, by: str) -> str:
  op = str(e['args']['hlo_op'])
  if by == 'kind':
    return op_kind(op)
  if by == 'kernel':
    return op_kind(re.sub(r'(_\d+)+$', '', str(e.get('name', op))))[:100]
  if by == 'category':
    return category(str(e.get('name', '')), op)
  return op


def summarize(events, module: str = '', by: str = 'kind') -> dict:
  """Total duration (microseconds) and count per group (see `--by`) of the events naming
  an XLA op."""
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    args = e.get('args') or {}
    if e.get('ph') != 'X' or 'hlo_op' not in args:
      continue
    if module and module not in str(args.get('hlo_module', '')):
      continue
    kind = _group(e, by)
    total[kind] += float(e.get('dur', 0.0))
    count[kind] += 1
  busy = sum(total.values())
  kinds = [{'op': k, 'us': round(us, 1), 'share': round(us / busy, 4) if busy else 0.0,
            'count': count[k]} for k, us in total.most_common()]
  return {'busy_us': round(busy, 1), 'kinds': kinds}


def main(argv):
  if len(argv) != 2:
    print('error: give one profile directory (usage: python -m benchmarks.trace_summary DIR)',
          file=sys.stderr)
    sys.exit(2)
  try:
    path = newest_trace(argv[1])
    with gzip.open(path, 'rt') as f:
      events = json.load(f)['traceEvents']
  except (ValueError, OSError, KeyError, json.JSONDecodeError) as e:
    print(f'error: cannot read a trace from {argv[1]}: {e}', file=sys.stderr)
    sys.exit(2)
  summary = summarize(events, _MODULE.value, _BY.value)
  if not summary['kinds']:
    print(f'error: no XLA ops of a module matching {_MODULE.value!r} in {path}',
          file=sys.stderr)
    sys.exit(2)
  kinds = summary['kinds'][:_TOP.value]
  print(f'{path}: {summary["busy_us"] / 1e3:.1f} ms of op time')
  for k in kinds:
    print(f'{k["share"]:7.1%} {k["us"] / 1e3:10.2f} ms {k["count"]:6d}x  {k["op"]}')
  print(json.dumps({'benchmark': 'trace_summary', 'trace': path,
                    'busy_us': summary['busy_us'], 'top': kinds}))


if __name__ == '__main__':
  app.run(main)
