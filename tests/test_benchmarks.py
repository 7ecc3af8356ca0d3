"""The benchmark scripts run on the tiny config and report consistent figures.

They run as subprocesses: each script defines absl flags (`--config`) at import, as
sample.evaluate does, and one pytest process cannot hold both.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *flags):
  return subprocess.run([sys.executable, '-m', module, '--config=configs/tiny.py', *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def _last_json(proc) -> dict:
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sampling_benchmark_reports_ratio_and_compile_times():
  r = _last_json(_run('benchmarks.sampling', '--batch=2', '--steps=2', '--repeats=1',
                      '--compile_steps=2,3'))
  assert r['benchmark'] == 'sampling' and r['batch'] == 2 and r['steps'] == 2
  assert r['realcustom_s_per_image'] > 0 and r['cfg_s_per_image'] > 0
  # The reported times are rounded to 5 decimals (milliseconds here), the ratio is not.
  ratio = r['realcustom_s_per_image'] / r['cfg_s_per_image']
  assert abs(r['ratio_vs_cfg'] - ratio) < 0.05 * ratio
  assert r['compile_s_2_steps'] > 0 and r['compile_s_3_steps'] > 0


def test_sampling_benchmark_rejects_bad_flags():
  bad = _run('benchmarks.sampling', '--batch=0')
  assert bad.returncode == 2 and 'batch' in bad.stderr and 'Traceback' not in bad.stderr


def test_train_step_benchmark_counts_flops_and_mfu():
  r = _last_json(_run('benchmarks.train_step', '--steps=2', '--warmup=1', '--peak_tflops=1'))
  assert r['benchmark'] == 'train_step' and r['encoders'] == 'excluded'
  assert r['flops_per_step'] > 0 and r['steps_per_sec'] > 0
  assert abs(r['mfu'] - r['tflops_per_sec'] / 1.0) < 1e-3
  assert r['adapter_params'] > 0 and r['frozen_unet_params'] > r['adapter_params']
