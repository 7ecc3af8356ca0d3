"""`python -m sample.app`, the Gradio demo, driven over HTTP with gradio_client.

The tiny config with 3 steps, served in this process on a free loopback port (so the
test can read the jitted samplers' compile counters), and once as the real command
line in a subprocess (served, fetched, stopped by SIGTERM in bounded time).
"""
import json
import re
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import zlib

import numpy as np
from PIL import Image
import pytest

os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')  # before gradio is imported
# Installed by `make test` (the `demo` extra): a missing install fails here, not skips.
import gradio_client  # noqa: E402  pylint: disable=g-import-not-at-top

from realcustom_jax.runtime import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from sample import demo_inputs  # noqa: E402  pylint: disable=g-import-not-at-top
from sample import demo_state  # noqa: E402  pylint: disable=g-import-not-at-top
from sample import demo_ui  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import testing  # noqa: E402  pylint: disable=g-import-not-at-top

# Gradio answers each gr.Error through a constant Starlette deprecates.
pytestmark = pytest.mark.filterwarnings('ignore:.*HTTP_422_UNPROCESSABLE_ENTITY')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
MAX_STEPS = 8
PROMPT = 'a toy on the beach'
# The paper pipeline's generate endpoint, in the page's order after the image.
GOOD = dict(prompt=PROMPT, word='toy', seed=0, num_images=1, num_steps=STEPS,
            guidance_text=7.5, guidance_image=12.5, gamma_scope=0.25, gamma_num=0.8,
            scope='soft')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _png_header(path, width: int, height: int) -> None:
  """A PNG whose header claims width x height (PIL reads the size without decoding)."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8,
                                                              2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(b'')) + chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def served():
  """(demo, client): the tiny config's app, warmed and served on a free loopback port."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.sampler.num_steps = STEPS
  with pytest.warns(UserWarning, match='UNTRAINED'):
    pipe = pipelines.load_pipeline(config)
  demo = demo_state.Demo(pipe, max_images=2, max_steps=MAX_STEPS)
  demo.warm_up()
  blocks = demo_ui.build_ui(demo)
  url = demo_ui.launch(blocks, '127.0.0.1', _free_port())
  assert url.startswith('http://127.0.0.1:')
  yield demo, gradio_client.Client(url, verbose=False)
  start = time.perf_counter()
  blocks.close(verbose=False)
  assert time.perf_counter() - start < 10


def _generate(client, subject, **changes):
  values = dict(GOOD, **changes)
  image = gradio_client.handle_file(subject) if subject else None
  return client.predict(image, *values.values(), api_name='/generate')


def _rgb(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert('RGB'))


def test_generate_returns_images_scope_strip_and_plain_t2i(served, subject):
  demo, client = served
  images, plain, strip, status = _generate(client, subject)
  assert len(images) == 1 and len(plain) == 1
  image = Image.open(images[0]['image'])
  assert image.size == (32, 32) and image.mode == 'RGB'
  assert Image.open(plain[0]['image']).size == (32, 32)
  assert images[0]['caption'] == 'seed 0, image 1'
  # 3 labelled steps (all of them), one image: a scope row above an x0 row.
  columns = demo_inputs.strip_steps(STEPS)
  assert columns == [0, 1, 2]
  assert Image.open(strip).size == (demo_inputs.STRIP_MARGIN + 3 * (demo_inputs.STRIP_TILE + 4),
                                    demo_inputs.STRIP_HEADER + 2 * demo_inputs.STRIP_TILE + 4)
  assert status.startswith('generated 1 image in ')
  assert 'no recompile' in status  # the warm-up compiled exactly this
  assert demo.compile_seconds is not None


def test_traced_settings_never_recompile(served, subject):
  demo, client = served
  from realcustom_jax import sampler  # pylint: disable=g-import-not-at-top
  realcustom = sampler.cached_sampler(demo.pipe.model, True)
  plain = sampler.cached_cfg_sampler(demo.pipe.model, False)
  first = _generate(client, subject, seed=1)
  counts = (realcustom._cache_size(), plain._cache_size())  # pylint: disable=protected-access
  second = _generate(client, subject, seed=2, guidance_text=3.0, guidance_image=1.5,
                     gamma_scope=0.6, gamma_num=0.3)
  assert (realcustom._cache_size(), plain._cache_size()) == counts  # pylint: disable=protected-access
  assert 'no recompile' in first[3] and 'no recompile' in second[3]
  assert not np.array_equal(_rgb(first[0][0]['image']), _rgb(second[0][0]['image']))
  assert not np.array_equal(_rgb(first[1][0]['image']), _rgb(second[1][0]['image']))


def test_a_new_step_count_says_it_compiles(served, subject):
  demo, client = served
  key = demo_state.StaticKey(STEPS + 1, 1, False, 'paper', False)
  assert 'compiles once on first use' in demo.compile_note(key)
  job = client.submit(gradio_client.handle_file(subject), *dict(
      GOOD, num_steps=STEPS + 1).values(), api_name='/generate')
  outputs = job.result(), job.outputs()
  assert outputs[1][0][3] == f'compiling for {STEPS + 1} steps x 1 image, soft scope (first use) ...'
  assert 'compiled 2 new sampler program(s) (first use)' in outputs[0][3]
  assert 'compiled, runs at once' in demo.compile_note(key)


@pytest.mark.parametrize('changes, message', [
    (dict(word='cat'), "target word 'cat' does not occur in prompt 'a toy on the beach'"),
    (dict(word=''), 'pick the target word'),
    (dict(prompt='  '), 'type a prompt'),
    (dict(gamma_scope=1.5), 'gamma_scope must lie in [0, 1], got 1.5'),
    (dict(gamma_num=-0.1), 'gamma_num must lie in [0, 1]'),
    (dict(num_images=3), 'number of images must lie in [1, 2], got 3'),
    (dict(num_steps=MAX_STEPS + 1), f'steps must lie in [1, {MAX_STEPS}] (the --max_steps'),
    (dict(num_steps=0), f'steps must lie in [1, {MAX_STEPS}]'),
    (dict(guidance_text='x'), "w_t must be a number, got 'x'"),
    (dict(seed=-1), 'seed must lie in [0, 2**32)'),
    (dict(scope='hard'), "scope must be 'soft' or 'binary'"),
])
def test_bad_input_is_a_message(served, subject, changes, message):
  _, client = served
  with pytest.raises(gradio_client.exceptions.AppError) as error:
    _generate(client, subject, **changes)
  text = str(error.value)
  assert message in text and '\n' not in text and 'Traceback' not in text


def test_bad_images_are_a_message_and_the_worker_lives_on(served, subject, tmp_path):
  _, client = served
  not_image = tmp_path / 'notes.png'
  not_image.write_text('not an image')
  truncated = tmp_path / 'cut.png'
  Image.new('RGB', (64, 64), 'red').save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:60])
  huge = tmp_path / 'huge.png'
  _png_header(huge, 10000, 5000)
  cases = [(None, 'upload a subject image first'),
           (not_image, 'subject image notes.png is not an image file PIL can read'),
           (truncated, 'subject image cut.png is corrupt or truncated'),
           (huge, 'subject image huge.png is 10000x5000 pixels: the demo takes images up '
                  'to 40 megapixels')]
  for path, message in cases:
    with pytest.raises(gradio_client.exceptions.AppError) as error:
      _generate(client, str(path) if path else None)
    assert message in str(error.value)
  assert _generate(client, subject)[3].startswith('generated 1 image')


def test_word_choices_follow_the_prompt():
  assert demo_inputs.word_choices('a teddy bear on the beach') == ['teddy', 'bear', 'beach',
                                                          'teddy bear']
  assert demo_inputs.word_choices('A dog, wearing sunglasses!') == [
      'dog', 'wearing', 'sunglasses', 'wearing sunglasses']
  assert demo_inputs.word_choices('on the') == ['on', 'the']  # function words only: all of them
  assert demo_inputs.word_choices('') == []
  choices = demo_inputs.word_choices('a cat on a sofa')
  assert demo_inputs.pick_word('a cat on a sofa', 'toy', choices) == 'cat'  # gone: the first
  assert demo_inputs.pick_word('a cat on a sofa', 'sofa', choices) == 'sofa'  # still there: kept


def _cli(*args, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu', GRADIO_ANALYTICS_ENABLED='False')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', cli.default_compile_cache_dir())
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  return [sys.executable, '-m', 'sample.app', '--config=configs/tiny.py', *args], dict(
      cwd=ROOT, env=env, text=True, **kwargs)


@pytest.mark.parametrize('flag, message', [
    ('--port=0', '--port must lie in [1, 65535], got 0'),
    ('--max_images=0', '--max_images must be at least 1'),
    ('--host=', '--host must not be empty'),
])
def test_bad_flags_exit_2_in_one_line(flag, message):
  command, options = _cli(flag)
  proc = subprocess.run(command, capture_output=True, timeout=120, **options)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith(f'error: {message}')
  assert len(proc.stderr.strip().splitlines()) == 1


def test_a_taken_port_exits_2_before_loading():
  with socket.create_server(('127.0.0.1', 0)) as taken:
    port = taken.getsockname()[1]
    command, options = _cli(f'--port={port}')
    proc = subprocess.run(command, capture_output=True, timeout=120, **options)
  assert proc.returncode == 2
  assert proc.stderr.startswith(f'error: cannot listen on 127.0.0.1:{port}')
  assert len(proc.stderr.strip().splitlines()) == 1


def test_command_line_serves_the_page_and_stops_on_sigterm():
  port = _free_port()
  command, options = _cli(f'--config.sampler.num_steps={STEPS}', f'--port={port}')
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          **options)
  try:
    lines, reader = testing.wait_until_ready(proc, 150)
    log = ''.join(lines)
    assert f'ready: http://127.0.0.1:{port}/ (start-up ' in log
    assert 'compile included' in log and 'Traceback' not in log
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=30) as page:
      assert page.status == 200 and page.read().startswith(b'<!doctype html>')
    with urllib.request.urlopen(f'http://127.0.0.1:{port}/config', timeout=30) as page:
      config = json.loads(page.read())
    assert config['title'] == 'RealCustom demo'
    public = [d['api_name'] for d in config['dependencies']
              if d.get('api_visibility', 'public') == 'public']
    assert public == ['generate']  # the page's helpers are not part of the API
    start = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert time.perf_counter() - start < 30
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  reader.join(5)
  assert any('server stopped in' in line for line in lines), ''.join(lines[-5:])


def test_release_pipeline_page(subject):
  """configs/release_tiny.py: the release's controls, and traced values never recompile."""
  from configs import release_tiny  # pylint: disable=g-import-not-at-top
  from realcustom_jax import pipelines  # pylint: disable=g-import-not-at-top
  demo = demo_state.Demo(pipelines.load_pipeline(release_tiny.get_config()), max_images=1)
  assert demo.family.name == 'release' and demo.defaults() == dict(
      guidance_scale=3.5, mask_scope=0.25, mask_strategy=['max_norm'], mask_reused_step=2)
  demo.warm_up()
  blocks = demo_ui.build_ui(demo)
  client = gradio_client.Client(demo_ui.launch(blocks, '127.0.0.1', _free_port()), verbose=False)
  try:
    def generate(**changes):
      values = dict(prompt='a toy on the beach', word='toy', seed=0, num_images=1,
                    num_steps=4, guidance_scale=3.5, mask_scope=0.25,
                    mask_strategy=['max_norm'], mask_reused_step=2)
      values.update(changes)
      return client.predict(gradio_client.handle_file(subject), *values.values(),
                            api_name='/generate')
    programs = demo.sampler_programs()
    first = generate(seed=1)
    second = generate(seed=2, guidance_scale=6.0, mask_scope=0.6, mask_reused_step=3)
    assert demo.sampler_programs() == programs
    assert 'no recompile' in first[3] and 'no recompile' in second[3]
    assert Image.open(first[0][0]['image']).size == (48, 64)  # release_tiny: 48 x 64 px
    assert Image.open(first[2]).size[0] > Image.open(first[2]).size[1]
    reuse_off = demo_state.StaticKey(4, 1, False, ('max_norm',), False)  # on at start-up
    assert 'reuse off: compiles once on first use' in demo.compile_note(reuse_off)
    for changes, message in [
        (dict(mask_strategy=[]), 'pick at least one mask strategy mode'),
        (dict(mask_strategy=['nope']), "mask_strategy must be 'paper' or release mask modes"),
        (dict(word='Toy'), "target word 'Toy' does not occur"),  # str.find: case-sensitive
        (dict(mask_scope=2.0), 'gamma_scope must lie in [0, 1], got 2.0')]:
      with pytest.raises(gradio_client.exceptions.AppError, match=re.escape(message)):
        generate(**changes)
  finally:
    blocks.close(verbose=False)
