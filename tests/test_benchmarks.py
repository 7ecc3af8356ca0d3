"""The benchmark scripts run on the tiny config and report consistent figures."""
import json
import os
import subprocess
import sys

from benchmarks import sampling  # defines absl flags: train_step runs as a subprocess
from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sampling_benchmark_reports_ratio_and_compile_times():
  r = sampling.benchmark(tiny.get_config(), batch=2, steps=2, repeats=1, compile_steps=(2, 3))
  assert r['realcustom_s_per_image'] > 0 and r['cfg_s_per_image'] > 0
  # The reported times are rounded to 5 decimals (milliseconds here), the ratio is not.
  ratio = r['realcustom_s_per_image'] / r['cfg_s_per_image']
  assert abs(r['ratio_vs_cfg'] - ratio) < 0.05 * ratio
  assert r['compile_s_2_steps'] > 0 and r['compile_s_3_steps'] > 0
  assert r['batch'] == 2 and r['steps'] == 2


def test_train_step_benchmark_counts_flops_and_mfu():
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.train_step', '--config=configs/tiny.py',
       '--steps=2', '--warmup=1', '--peak_tflops=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r['flops_per_step'] > 0 and r['steps_per_sec'] > 0
  assert abs(r['mfu'] - r['tflops_per_sec'] / 1.0) < 1e-3
  assert r['adapter_params'] > 0 and r['frozen_unet_params'] > r['adapter_params']


def test_sampling_cli_prints_json_last_and_rejects_bad_flags():
  run = lambda *flags: subprocess.run(
      [sys.executable, '-m', 'benchmarks.sampling', '--config=configs/tiny.py', *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  bad = run('--batch=0')
  assert bad.returncode == 2 and 'batch' in bad.stderr and 'Traceback' not in bad.stderr
  ok = run('--steps=2', '--repeats=1', '--compile_steps=2')
  assert ok.returncode == 0, ok.stderr[-2000:]
  result = json.loads(ok.stdout.strip().splitlines()[-1])
  assert result['benchmark'] == 'sampling' and result['ratio_vs_cfg'] > 0
