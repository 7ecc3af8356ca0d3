"""`python -m sample.app` in a real browser: Debian's chromium and chromedriver, driven by
selenium, open the page, upload a subject, click Generate, wait for the images and the
scope strip; on the shipped toy model, save a screenshot to docs/demo/app.png (the one
docs/demo.md shows).

  apt-get install -y chromium chromium-driver    # Debian / Ubuntu
  make test-slow                                  # or: pytest -m slow tests/test_app_browser.py

Skipped, with one line, where chromium or chromedriver is not installed.
"""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys

from PIL import Image
from PIL import ImageDraw
import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')
CHROMEDRIVER = shutil.which('chromedriver')
if not (CHROMIUM and CHROMEDRIVER):
  pytest.skip('no chromium/chromedriver installed (apt-get install chromium chromium-driver)',
              allow_module_level=True)
pytest.importorskip('gradio', reason="needs gradio: pip install -c requirements-lock.txt "
                    "-e '.[test]'")
webdriver = pytest.importorskip('selenium.webdriver', reason='needs selenium: pip install '
                                "-c requirements-lock.txt -e '.[test]'")
from selenium.webdriver.common.by import By  # noqa: E402  pylint: disable=g-import-not-at-top
from selenium.webdriver.support import expected_conditions  # noqa: E402  pylint: disable=g-import-not-at-top
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402  pylint: disable=g-import-not-at-top

from realcustom_jax.runtime import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import testing  # noqa: E402  pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCREENSHOT = os.path.join(ROOT, 'docs', 'demo', 'app.png')
# Without the networking switches Chromium keeps trying Google's services, which a
# closed network refuses; a fresh profile per run.
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage',
                  '--hide-scrollbars', '--window-size=1400,1000')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _served(*flags, config: str = 'configs/tiny.py', timeout: float = 180):
  """The command line serving `config`; yields its URL, then stops it (SIGTERM)."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu', GRADIO_ANALYTICS_ENABLED='False')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', cli.default_compile_cache_dir())
  env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  proc = subprocess.Popen(
      [sys.executable, '-m', 'sample.app', f'--config={config}', f'--port={port}',
       *flags], cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT)
  try:
    testing.wait_until_ready(proc, timeout)
    yield f'http://127.0.0.1:{port}/'
  finally:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _subject(path) -> str:
  """A toy-like subject: a red ball with a yellow band on white."""
  image = Image.new('RGB', (256, 256), 'white')
  draw = ImageDraw.Draw(image)
  draw.ellipse((40, 40, 216, 216), fill=(210, 30, 40))
  draw.rectangle((40, 118, 216, 138), fill=(250, 210, 40))
  image.save(path)
  return str(path)


def _generate_in_browser(tmp_path, url, subject, screenshot, prompt=None, word=None):
  """Opens the page, uploads `subject`, optionally types the prompt and the word, clicks
  Generate, waits for every result image, and saves a screenshot of the whole page."""
  from selenium.webdriver.common.keys import Keys  # pylint: disable=g-import-not-at-top
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in CHROMIUM_FLAGS + (f'--user-data-dir={tmp_path / "profile"}',):
    options.add_argument(flag)
  # The Debian driver, named: selenium then never looks for (or downloads) another.
  service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
  driver = webdriver.Chrome(options=options, service=service)
  try:
    driver.set_page_load_timeout(60)
    driver.get(url)
    wait = WebDriverWait(driver, 90)
    upload = wait.until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, '#subject input[type=file]')))
    upload.send_keys(subject)
    wait.until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, '#subject img')))
    if prompt is not None:
      box = driver.find_element(By.CSS_SELECTOR, '#prompt textarea')
      box.clear()
      box.send_keys(prompt)
    if word is not None:
      field = driver.find_element(By.CSS_SELECTOR, '#word input')
      field.send_keys(Keys.CONTROL, 'a')
      field.send_keys(word, Keys.ENTER)
    driver.find_element(By.CSS_SELECTOR, '#generate').click()
    status = lambda d: d.find_element(By.CSS_SELECTOR, '#status textarea').get_attribute(
        'value')
    wait.until(lambda d: status(d).startswith(('generated', 'error')))
    text = status(driver)
    # The results are on the page: one image each, the strip, all decoded.
    loaded = ('return Array.from(document.querySelectorAll(arguments[0]))'
              '.filter(i => i.complete && i.naturalWidth > 0).length')
    if text.startswith('generated'):
      for selector in ('#images img', '#plain img', '#strip img'):
        wait.until(lambda d, s=selector: d.execute_script(loaded, s) >= 1)
    height = driver.execute_script('return document.documentElement.scrollHeight')
    driver.set_window_size(1400, min(max(height, 800), 2400))
    os.makedirs(os.path.dirname(screenshot), exist_ok=True)
    assert driver.save_screenshot(screenshot)
    return text
  finally:
    driver.quit()


def test_browser_uploads_generates_and_screenshots(tmp_path):
  subject = _subject(tmp_path / 'toy.png')
  with _served('--config.sampler.num_steps=5') as url:
    status = _generate_in_browser(tmp_path, url, subject, str(tmp_path / 'tiny.png'))
  assert status.startswith('generated'), status
  assert 'no recompile' in status  # the start-up warm-up compiled it
  with Image.open(tmp_path / 'tiny.png') as shot:
    assert shot.width >= 1000 and shot.height >= 700


def test_browser_customizes_with_the_shipped_toy_model(tmp_path):
  """The README's web-demo command: a held-out toy identity drawn where "circle" is."""
  from toy import shipped  # pylint: disable=g-import-not-at-top
  from toy import world  # pylint: disable=g-import-not-at-top
  sd, vision, adapter = shipped.materialise(str(tmp_path / 'model'))
  case = world.eval_cases(16, 1)[0]
  subject = str(tmp_path / 'subject.png')
  Image.fromarray(world.render(case.subject, 16)[0]).save(subject)
  with _served(f'--pretrained={sd}', f'--vision_encoder={vision}', f'--adapter={adapter}',
               config='configs/toy_world.py') as url:
    status = _generate_in_browser(tmp_path, url, subject, SCREENSHOT,
                                  prompt='a circle on a yellow background', word='circle')
  assert status.startswith('generated'), status
  with Image.open(SCREENSHOT) as shot:
    assert shot.width >= 1000 and shot.height >= 700
