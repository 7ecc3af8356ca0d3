"""The toy reproduction's wiring: every stage runs, reports every variant, and resumes.

A subprocess, as for the other benchmarks: the script defines absl flags at import.
The smoke sizes train for a few steps, so the numbers mean nothing; what is checked is
that each stage hands the next what it needs and that a rerun skips finished stages.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*flags):
  # One CPU device, as the command runs outside the suite (conftest fakes 8, and the
  # smoke batch of 4 does not split over 8).
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  return subprocess.run([sys.executable, '-m', 'toy.reproduction', *flags],
                        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow  # `make test-slow` (Makefile: the suite's time budget)
def test_smoke_run_reports_every_variant_and_a_rerun_skips_training(tmp_path):
  proc = _run(f'--workdir={tmp_path}', '--smoke')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  variants = result['variants']
  assert set(variants) == {'plain_t2i', 'named_prompt', 'no_mask', 'realcustom',
                           'gamma_num_1', 'oracle_k8', 'gain_off', 'scope_pool',
                           'no_mask_wi_5', 'gamma_1', 'binary_0.25', 'g1_eq4_sum',
                           'g1_visual_only', 'g1_doubled', 'textual_inversion_2',
                           'dreambooth_2'}
  n = result['cases'] * len(result['seeds'])
  assert all(v['n'] == n for v in variants.values())
  for v in variants.values():  # the names for the three axes
    assert {'text_control', 'subject_sim', 'identity_acc'} <= set(v)
  realcustom = variants['realcustom']
  assert realcustom['training_seeds'] == [0] and len(realcustom['identity_acc_per_seed']) == 1
  assert variants['plain_t2i']['training_seeds'] == []
  # Gate A: the oracle row keeps exactly the oracle's tokens at every step, and its
  # precision is above the random choice's (a reference always has background tokens).
  oracle = variants['oracle_k8']
  assert abs(oracle['selection_precision'] - oracle['selection_oracle_precision']) < 1e-6
  assert oracle['selection_precision'] > oracle['selection_random_precision']
  assert 0.0 <= realcustom['selection_precision'] <= 1.0
  assert set(result['gates']) == {'G0', 'G1', 'G2', 'GA', 'G3'}
  assert result['baseline_curves'] == {'textual_inversion': ['textual_inversion_2'],
                                       'dreambooth': ['dreambooth_2']}
  # G1 feeds the naming caption through the visual branch alone: it must equal the
  # naming prompt through the text path (exactly, up to float error).
  assert result['gates']['G1']['visual_only_vs_text_max_abs'] < 1e-4
  # Binary top-k at gamma_scope 1 keeps every position: no mask guidance at all.
  assert variants['no_mask']['scope'] == 'all ones'
  assert variants['no_mask']['scope_in_object'] < 1.0
  assert '| realcustom | adaptive | learned @ gamma_num config | soft | 0.25 | 1 |' in proc.stdout
  for name in ('tradeoff.png', 'samples.png', 'results.json'):
    assert os.path.getsize(tmp_path / 'eval' / name) > 0
  assert os.path.isfile(tmp_path / 'adapter_adaptive' / 'seed0' / 'adapter.safetensors')
  assert not os.path.exists(tmp_path / 'adapter_none')  # the smoke run trains one
  assert os.path.isfile(tmp_path / 'base' / 'sd' / 'model_index.json')

  again = _run(f'--workdir={tmp_path}', '--smoke')
  assert again.returncode == 0, again.stderr[-3000:]
  rerun = json.loads(again.stdout.strip().splitlines()[-1])
  assert rerun['variants'] == variants  # the finished evaluation is reused too
  wall = rerun['this_run_wall_s']
  # Finished stages are found and skipped: no training, no train.main subprocess.
  assert wall['base_s'] < 2 and wall['adapter_adaptive_s'] < 2 and wall['eval_s'] < 2


def test_bad_flags_are_one_line_errors(tmp_path):
  blocked = tmp_path / 'file'
  blocked.write_text('')
  proc = _run(f'--workdir={blocked}/sub', '--smoke')
  assert proc.returncode == 2 and 'workdir' in proc.stderr and 'Traceback' not in proc.stderr
  proc = _run(f'--workdir={tmp_path}', '--smoke', 'extra')
  assert proc.returncode == 2 and 'unexpected' in proc.stderr
  proc = _run(f'--workdir={tmp_path}/w', '--config=configs/toy_world.py:smoke',
              '--config.toy.gamma_scopes=(0.25,1.5)')
  assert proc.returncode == 2 and 'gamma_scopes' in proc.stderr
  assert 'Traceback' not in proc.stderr and not os.path.exists(tmp_path / 'w')
  for bad, key in (("--config.toy.adapters=('adaptive','nope')", 'adapters'),
                   ('--config.toy.adapter_seeds=(0,0)', 'adapter_seeds'),
                   ("--config.toy.fixed_selections=('best:0.5',)", 'fixed_selections'),
                   ('--config.toy.main_adapter=none', 'main_adapter'),
                   ('--config.toy.subject_encoder=clip', 'subject_encoder'),
                   ('--config.toy.encoder.vision.patch_size=3', 'encoder.vision')):
    proc = _run(f'--workdir={tmp_path}/w', '--config=configs/toy_world.py:smoke', bad)
    assert proc.returncode == 2 and key in proc.stderr, (bad, proc.stderr[-500:])
    assert 'Traceback' not in proc.stderr


def test_adapter_stamp_ignores_docstrings_and_comments_not_code():
  # A docstring edit must keep the trained adapters (retraining 30 of them costs hours);
  # a code edit must not.
  code = '''
import textwrap
import toy.reproduction as r
base = textwrap.dedent("""
    def f(x):
      \\"\\"\\"Doubles.\\"\\"\\"
      return 2 * x  # twice
    """)
doc = base.replace('Doubles.', 'Twice x.').replace('# twice', '# two times')
code = base.replace('2 * x', '3 * x')
print(r._code_without_docs(base) == r._code_without_docs(doc),
      r._code_without_docs(base) == r._code_without_docs(code), len(r.model_fingerprint()))
'''
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['True', 'False', '16']


def test_the_target_compares_the_main_adapter_with_its_id2_row():
  """The target reads the ID-2 row trained on the main adapter's kind of reference
  (`no_scoring` for the word-map recipe, `no_scoring_ref` for a stored-reference one);
  without an ID-2 row it cannot be met."""
  from configs import toy_world  # pylint: disable=g-import-not-at-top
  from toy import evaluation  # pylint: disable=g-import-not-at-top
  config = toy_world.get_config()
  assert config.toy.main_adapter == 'adaptive_wordmap_narrow'
  row = lambda i, s, t=1.0: {'id': i, 'sim': s, 'text': t}
  summary = {'plain_t2i': row(0.02, 0.17), 'named_prompt': row(0.94, 0.79),
             'realcustom_adaptive_wordmap_narrow': row(0.65, 0.73, 0.99),
             'no_scoring': row(0.615, 0.724, 0.98), 'dreambooth_160': row(0.42, 0.60, 0.8)}
  target = evaluation._target(config, summary)  # pylint: disable=protected-access
  assert target['id2_identity_acc'] == 0.615 and target['at_least_id2'] is True
  assert target['met'] is True
  summary['no_scoring'] = row(0.70, 0.724)
  target = evaluation._target(config, summary)  # pylint: disable=protected-access
  assert target['at_least_id2'] is False and target['met'] is False
  config.toy.adapters = ('adaptive', 'adaptive_wordmap_narrow')  # no ID-2 trained
  target = evaluation._target(config, summary)  # pylint: disable=protected-access
  assert target['at_least_id2'] is None and target['met'] is False
  config.toy.adapters = ('adaptive_ref', 'none', 'none_ref')
  config.toy.main_adapter = 'adaptive_ref'
  summary['realcustom_ref'] = row(0.65, 0.73, 0.99)
  summary['no_scoring_ref'] = row(0.5, 0.6)
  target = evaluation._target(config, summary)  # pylint: disable=protected-access
  assert target['id2_identity_acc'] == 0.5 and target['met'] is True
