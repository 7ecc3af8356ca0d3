"""What the command-line entry points share: flag and config mistakes as one line.

  app.run(main, flags_parser=cli.flags_parser('error: '))

absl parses `--config=FILE` and `--config.a.b=V` overrides before `main` runs; a typo
in a key raises from inside the parser, which absl prints as a long traceback with exit
status 1. `flags_parser` turns every parsing mistake into one line on stderr and exit
status 2, keeping the "did you mean" suggestion ml_collections computes.
"""
from collections.abc import Callable, Sequence
import os
import re
import sys

from absl import flags
from etils import epath

EXIT_USAGE = 2
_SUGGESTION = re.compile(r'Did you mean "([^"]+)"')
_QUOTED = re.compile(r"^'([^']+)'")


def _innermost(error: BaseException) -> BaseException:
  """ml_collections wraps its KeyError in an AttributeError; the KeyError has the text."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  return error


def _override_naming(argv: Sequence[str], key: str) -> str | None:
  """The `--config.x.key=...` argument that names `key`, if there is one."""
  for arg in argv[1:]:
    name = arg.split('=', 1)[0].lstrip('-')
    if '.' in name and key in name.split('.')[1:]:
      return arg.split('=', 1)[0]
  return None


def flag_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """One line describing an exception raised while absl parsed `argv`.

  Args:
    error: what the flag parser raised.
    argv: the command line (program name first).

  Returns:
    The message, without a prefix or a newline.
  """
  inner = _innermost(error)
  text = str(inner.args[0]) if inner.args else str(inner)
  if isinstance(inner, (KeyError, AttributeError)):
    quoted = _QUOTED.match(text)
    key = quoted.group(1) if quoted else text.splitlines()[0].strip("'\"")
    flag = _override_naming(argv, key) or 'a --config override'
    message = f'{flag}: the config has no key {key!r}'
    suggestion = _SUGGESTION.search(text)
    if suggestion:
      message += f' (did you mean {suggestion.group(1)!r}?)'
    return message
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return type(inner).__name__
  if isinstance(inner, OSError) and len(lines) > 1:
    # "Failed loading config file X" + the paths tried; the last line says why.
    return f'cannot load the config file: {lines[-1]}'
  if lines[0].endswith(':') and len(lines) > 1:
    # "Error whilst parsing config file:" + a traceback whose last line is the error.
    return f'{lines[0]} {lines[-1]}'
  return lines[0]


def _raise_deferred_config_errors() -> None:
  """Raises the load error of a config file that ml_collections deferred.

  A missing or broken `--config` file does not fail parsing: the flag's value becomes
  an object that raises on first use, which would be a traceback inside `main`.
  """
  for name in list(flags.FLAGS):
    value = flags.FLAGS[name].value
    if type(value).__name__ == '_ErrorConfig':  # ml_collections' deferred error
      value.lock()  # any attribute access raises the stored error


def flags_parser(prefix: str = 'error: ') -> Callable[[list[str]], list[str]]:
  """An `app.run(flags_parser=...)` that exits 2 with one line on any flag mistake.

  Args:
    prefix: put before the message (each entry point's usual error prefix).

  Returns:
    The parser: argv -> remaining arguments, like absl's own.
  """
  def parse(argv: list[str]) -> list[str]:
    try:
      remaining = flags.FLAGS(argv)
      _raise_deferred_config_errors()
      return remaining
    except Exception as e:  # pylint: disable=broad-except
      # Unknown flags and bad values (flags.Error), unknown config keys (KeyError /
      # AttributeError), a missing config file (OSError), a config file that raises.
      print(prefix + flag_error_message(e, argv), file=sys.stderr, flush=True)
      sys.exit(EXIT_USAGE)
  return parse


def absolute_path(path) -> epath.Path:
  """`path` as an `etils.epath.Path`: local paths made absolute, URLs kept as they are.

  `os.path.abspath('gs://b/run')` gives '/cwd/gs:/b/run', and so does
  `epath.Path(...).resolve()`; orbax and tfds take URLs as they are.

  Args:
    path: a local path or a URL (`gs://...`).

  Returns:
    The path.
  """
  text = str(path)
  return epath.Path(text) if is_url(text) else epath.Path(text).resolve()


def is_url(path) -> bool:
  """Whether `path` names a remote file system (`gs://`, `s3://`, ...)."""
  return '://' in str(path)


def define_compile_cache_flags() -> None:
  """--compile_cache / --compile_cache_dir, for the entry points that compile."""
  flags.DEFINE_bool('compile_cache', True,
                    "Keep compiled XLA programs in JAX's persistent compilation cache, so a "
                    'repeated run skips its compiles (--nocompile_cache: off).')
  flags.DEFINE_string('compile_cache_dir', None,
                      'The cache directory; default $JAX_COMPILATION_CACHE_DIR, else '
                      '$XDG_CACHE_HOME/realcustom_jax/xla (~/.cache/realcustom_jax/xla).')


def define_weight_flags():
  """--pretrained, --vision_encoder, --adapter, --allow_pickle, for the sampling entry
  points; returns their FlagHolders in that order."""
  return (
      flags.DEFINE_string('pretrained', None,
                          'Local diffusers Stable Diffusion directory (SDXL for '
                          'configs/release.py; overrides config.pretrained).'),
      flags.DEFINE_string('vision_encoder', None, 'Local CLIP vision model directory '
                          '(configs/release.py: the directory holding the two timm ViT '
                          'folders; overrides config.vision_encoder).'),
      flags.DEFINE_string('adapter', None, "Trained adapter .safetensors file (or the "
                          "release's, converted by sample.convert_release)."),
      flags.DEFINE_bool('allow_pickle', False,
                        'Accept torch .bin weights (unpickling runs code).'))


def apply_weight_flags(config, pretrained: str | None, vision_encoder: str | None,
                       adapter: str | None, allow_pickle: bool) -> None:
  """--pretrained / --vision_encoder / --adapter / --allow_pickle override the config's
  paths (None: the flag was not given); for the sampling entry points."""
  with config.unlocked():
    if pretrained is not None:
      config.pretrained = pretrained
    if vision_encoder is not None:
      config.vision_encoder = vision_encoder
    if adapter is not None:
      config.adapter = adapter
    if allow_pickle:
      config.allow_pickle = True


def user_cache_dir(*parts: str) -> str:
  """$XDG_CACHE_HOME/realcustom_jax/<parts> (~/.cache/realcustom_jax/<parts>)."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'realcustom_jax', *parts)


def default_compile_cache_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR, else the user cache directory's realcustom_jax/xla."""
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return os.environ['JAX_COMPILATION_CACHE_DIR']
  return user_cache_dir('xla')


def enable_compile_cache() -> str | None:
  """Turns JAX's persistent compilation cache on as the flags say (call before any
  compile); returns the directory, or None when off.

  Every compile is cached, however short: the tiny models' compiles are each under a
  second but add up to most of a CLI call on a laptop.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.compile_cache:
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  directory = flags.FLAGS.compile_cache_dir or default_compile_cache_dir()
  jax.config.update('jax_enable_compilation_cache', True)
  jax.config.update('jax_compilation_cache_dir', directory)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  return directory


def quiet_libraries() -> None:
  """Keeps diffusers' and transformers' own logging to errors, for the CLIs' `main`.

  Their Flax classes log a deprecation notice each time a model is built or traced;
  a command line shows ours instead. The library itself never does this: a program
  that imports it keeps its own logging settings. Call it after `skip_torch`.
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  diffusers.utils.logging.set_verbosity_error()
  transformers.logging.set_verbosity_error()


def skip_torch() -> None:
  """Keeps diffusers and transformers from importing torch in a CLI that reads only
  torch-free formats (safetensors, msgpack).

  diffusers imports torch whenever it is installed (it is a test dependency here), which
  cost about 3 s of every `sample.main` start on 2 cores (11-14 s -> 8-9 s per call).
  Call it before diffusers or transformers are imported; it does nothing once they are.
  Not for `--allow_pickle`, whose `.bin` files need torch.
  """
  if any(m in sys.modules for m in ('torch', 'diffusers', 'transformers')):
    return
  os.environ['USE_TORCH'] = '0'  # both libraries then treat torch as absent
  # transformers 5 then advises at import that "PyTorch was not found": not for our user.
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
  sys.modules['torch'] = None  # and diffusers' unconditional `import torch` fails softly
