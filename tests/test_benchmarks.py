"""The benchmark scripts run on the tiny config and report consistent figures.

They run as subprocesses: each script defines absl flags (`--config`) at import, as
sample.evaluate does, and one pytest process cannot hold both.
"""
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from benchmarks import trace_summary
import configs.tiny
from realcustom_jax.model import RealCustom
from realcustom_jax.unet import RealCustomUNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *flags):
  return subprocess.run([sys.executable, '-m', module, '--config=configs/tiny.py', *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def _last_json(proc) -> dict:
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sampling_benchmark_reports_ratio_and_compile_times(tmp_path):
  r = _last_json(_run('benchmarks.sampling', '--batch=2', '--steps=2', '--repeats=1',
                      '--compile_steps=2', '--unet_passes', f'--profile_dir={tmp_path}'))
  assert r['benchmark'] == 'sampling' and r['batch'] == 2 and r['steps'] == 2
  assert r['realcustom_s_per_image'] > 0 and r['cfg_s_per_image'] > 0
  # The reported times are rounded to 5 decimals (milliseconds here), the ratio is not.
  ratio = r['realcustom_s_per_image'] / r['cfg_s_per_image']
  assert abs(r['ratio_vs_cfg'] - ratio) < 0.05 * ratio
  assert r['compile_s_2_steps'] > 0 and r['compile_s_cfg'] > 0
  # Three UNet passes against two, plus the scoring, the visual K/V and Eq. 11: a
  # little over 1.5 in FLOPs (1.514 here, 1.515 at SD 1.5 size).
  assert 1.5 < r['flops_ratio_vs_cfg'] < 1.6
  assert abs(r['flops_ratio_vs_cfg'] - r['realcustom_flops_per_step']
             / r['cfg_flops_per_step']) < 1e-4
  # Timings on a shared machine say nothing about their order: only their consistency.
  assert r['unet_pass_ms_b'] > 0 and r['unet_pass_ms_2b'] > 0
  floor = 1 + r['unet_pass_ms_b'] / r['unet_pass_ms_2b']
  assert abs(r['three_pass_floor'] - floor) < 1e-3
  for loop in ('realcustom', 'cfg'):
    assert list((tmp_path / loop).rglob('*.trace.json.gz')), loop


def test_sampling_benchmark_rejects_bad_flags():
  bad = _run('benchmarks.sampling', '--batch=0')
  assert bad.returncode == 2 and 'batch' in bad.stderr and 'Traceback' not in bad.stderr


def test_train_step_benchmark_counts_flops_and_mfu_and_writes_a_trace(tmp_path):
  prof = tmp_path / 'prof'
  r = _last_json(_run('benchmarks.train_step', '--steps=2', '--warmup=1', '--peak_tflops=1',
                      f'--profile_dir={prof}', '--remat=dots'))
  assert r['benchmark'] == 'train_step' and r['encoders'] == 'excluded'
  assert r['flops_per_step'] > 0 and r['steps_per_sec'] > 0
  # MFU counts model FLOPs: the remat program recomputes, the model count does not.
  assert r['program_flops_per_step'] > r['flops_per_step'] and r['remat'] == 'dots'
  assert r['fused_attention_calls'] == 0  # XLA attention on a CPU
  assert abs(r['mfu'] - r['tflops_per_sec'] / 1.0) < 1e-3
  assert abs(r['tflops_per_sec'] - r['flops_per_step'] * r['steps_per_sec'] / 1e12) < 1e-3
  assert r['adapter_params'] > 0 and r['frozen_unet_params'] > r['adapter_params']
  # The traced steps summarise into op kinds whose shares add up to the whole.
  s = _last_json(subprocess.run([sys.executable, '-m', 'benchmarks.trace_summary', str(prof),
                                 '--top=1000'], cwd=ROOT, capture_output=True, text=True,
                                timeout=120))
  assert s['busy_us'] > 0 and s['top']
  assert abs(sum(k['share'] for k in s['top']) - 1.0) < 1e-2


def test_train_step_benchmark_rejects_bad_flags():
  bad = _run('benchmarks.train_step', '--steps=0')
  assert bad.returncode == 2 and 'steps' in bad.stderr and 'Traceback' not in bad.stderr


def test_trace_summary_rejects_a_directory_without_a_trace(tmp_path):
  bad = subprocess.run([sys.executable, '-m', 'benchmarks.trace_summary', str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert bad.returncode == 2 and 'no perfetto_trace' in bad.stderr
  assert 'Traceback' not in bad.stderr


def test_summarize_groups_ops_by_kind_and_module():
  def op(name, dur, module='jit_step'):
    return {'ph': 'X', 'dur': dur, 'name': 'kernel',
            'args': {'hlo_op': name, 'hlo_module': module}}
  events = [op('fusion.1', 30.0), op('fusion.2', 10.0), op('gemm.3.1', 60.0),
            op('fusion.4', 500.0, module='jit_other'),
            {'ph': 'X', 'dur': 1000.0, 'name': 'host work', 'args': {}},
            {'ph': 'M', 'name': 'process_name', 'args': {'name': '/device:GPU:0'}}]
  s = trace_summary.summarize(events, module='jit_step')
  assert s['busy_us'] == 100.0
  assert [(k['op'], k['us'], k['count']) for k in s['kinds']] == [('gemm', 60.0, 1),
                                                                 ('fusion', 40.0, 2)]
  assert [k['share'] for k in s['kinds']] == [0.6, 0.4]
  by_op = trace_summary.summarize(events, module='', by='op')
  assert by_op['kinds'][0]['op'] == 'fusion.4' and by_op['busy_us'] == 600.0


def test_summarize_groups_command_buffer_kernels_by_name_and_category():
  # On a GPU the kernels of a command buffer all carry the buffer's op name.
  def kernel(name, dur, op='command_buffer_12'):
    return {'ph': 'X', 'dur': dur, 'name': name,
            'args': {'hlo_op': op, 'hlo_module': 'jit_step'}}
  events = [kernel('cudnn_generated_fort_native_sdpa_sm90_flash_fprop', 50.0),
            kernel('nvjet_tst_128x256_64x4_2x1_v_bz_TNT', 30.0),
            kernel('loop_multiply_fusion_3', 5.0), kernel('loop_multiply_fusion_12', 5.0),
            kernel('sm90_xmma_fprop_implicit_gemm_bf16', 8.0, op='cudnn-conv-bias-activation.4'),
            kernel('memset32_aligned1D', 2.0),
            # Not what their names' substrings suggest: a cast, and cuDNN attention's own.
            kernel('loop_convert_fusion_2', 1.0),
            kernel('void cudnn::fusion::convert_dq_to_16bits<true>(void const*)', 4.0)]
  by_kernel = trace_summary.summarize(events, by='kernel')
  assert ('loop_multiply_fusion', 10.0, 2) in [
      (k['op'], k['us'], k['count']) for k in by_kernel['kinds']]
  by_category = trace_summary.summarize(events, by='category')
  assert [(k['op'], k['us']) for k in by_category['kinds']] == [
      ('attention', 54.0), ('matmul', 30.0), ('fused elementwise / reduction', 11.0),
      ('convolution', 8.0), ('other', 2.0)]


def test_random_params_match_init_shapes_and_scales():
  config = configs.tiny.get_config()
  a = common.arch(config, 'tiny')
  model = RealCustom(unet=RealCustomUNet.from_config(a.unet),
                     scoring_hidden=int(config.model.scoring_hidden), fusion=config.model.fusion)
  params = common.random_params(model, a, seed=0)
  c, h, w = a.latent
  want = jax.eval_shape(lambda r: model.init(
      r, jnp.zeros((1, c, h, w)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,) + a.text),
      jnp.zeros((1,) + a.image), sqrt_alpha_bar=jnp.ones((1,)),
      scope_mask=jnp.ones((1, h, w)))['params'], jax.random.PRNGKey(0))
  assert jax.tree.structure(params) == jax.tree.structure(want)
  assert ([(p.shape, p.dtype) for p in jax.tree.leaves(params)] ==
          [(s.shape, s.dtype) for s in jax.tree.leaves(want)])
  unet = params['unet']
  np.testing.assert_array_equal(unet['conv_norm_out']['scale'], 1.0)
  np.testing.assert_array_equal(unet['conv_norm_out']['bias'], 0.0)
  kernel = np.asarray(unet['conv_in']['kernel'])  # N(0, 1/fan_in), fan_in = 3*3*C_in
  fan_in = math.prod(kernel.shape[:-1])
  assert abs(kernel.std() * math.sqrt(fan_in) - 1.0) < 0.15
  assert np.all(np.isfinite(kernel))
  # Seeded: the same seed gives the same weights, another seed others.
  conv_in = lambda seed: common.random_params(model, a, seed=seed)['unet']['conv_in']['kernel']
  np.testing.assert_array_equal(conv_in(0), kernel)
  assert not np.array_equal(conv_in(1), kernel)


def test_train_step_benchmark_estimates_the_release_architecture():
  """The release's step from shapes only: model FLOPs and XLA's memory analysis (the
  figures docs/release.md gives at SDXL size, here on the tiny SDXL)."""
  r = _last_json(_run('benchmarks.train_step', '--arch=release_tiny', '--batch=1',
                      '--dtype=float32'))
  assert r['arch'] == 'release_tiny' and r['encoders'] == 'excluded'
  assert r['flops_per_step'] > 0 and r['adapter_params'] > 0
  # The donated train state is counted once; the frozen UNet is an argument.
  assert r['alias_size_in_bytes'] == r['train_state_bytes']
  assert r['argument_size_in_bytes'] >= r['frozen_unet_bytes'] + r['train_state_bytes']
  assert r['estimated_peak_bytes'] > r['argument_size_in_bytes']
