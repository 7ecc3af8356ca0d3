"""Where a profiled step spends its time: device time per XLA op kind, from a JAX trace.

  python -m benchmarks.train_step --arch=sd15 --dtype=bfloat16 --profile_dir=/tmp/prof
  python -m benchmarks.trace_summary /tmp/prof [--top=25] [--by=kind|op] [--module=jit_step]

Reads the newest `perfetto_trace.json.gz` under the directory (what
`jax.profiler.trace(..., create_perfetto_trace=True)` writes), keeps the events that
carry an XLA op (`hlo_op`; on a GPU these are the kernels), groups them by op kind (the
op name without its numeric suffix: `loop_multiply_fusion.12` -> `loop_multiply_fusion`)
and prints a table, largest first, then one JSON line with the same figures.

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
_BY = flags.DEFINE_enum('by', 'kind', ['kind', 'op'], 'Group by op kind, or list single ops.')
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


def summarize(events, module: str = '', by: str = 'kind') -> dict:
  """Total duration (microseconds) and count per op kind (or per op, `by='op'`) of the
  events naming an XLA op."""
  total = collections.Counter()
  count = collections.Counter()
  for e in events:
    args = e.get('args') or {}
    if e.get('ph') != 'X' or 'hlo_op' not in args:
      continue
    if module and module not in str(args.get('hlo_module', '')):
      continue
    kind = op_kind(str(args['hlo_op'])) if by == 'kind' else str(args['hlo_op'])
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
