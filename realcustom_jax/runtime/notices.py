"""A scoped silence for diffusers' Flax deprecation notice.

diffusers 0.3x logs "Flax classes are deprecated and will be removed in Diffusers
v0.40.0 ..." each time one of its Flax modules is built or traced: dozens of lines for
one `load_pipeline` and one call. The project pins the diffusers it uses and owns the
models diffusers dropped, so the notice says nothing to a user of this library. It is
dropped only while the project's own loading and decoding run (`flax_notice_silenced`),
from the handlers that would print it; every other record, and the user's logging
levels, stay as they were. The command lines quiet diffusers altogether
(`cli.quiet_libraries`).
"""
import contextlib
import functools
import logging

NOTICE = 'Flax classes are deprecated and will be removed in Diffusers'


class _DropFlaxNotice(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return NOTICE not in record.getMessage()


@contextlib.contextmanager
def flax_notice_silenced():
  """Within: the handlers of the `diffusers` logger and of the root logger drop the notice."""
  # diffusers installs its handler on first use: make sure it exists to be filtered.
  from diffusers.utils import logging as diffusers_logging  # pylint: disable=g-import-not-at-top
  diffusers_logging.get_logger('diffusers')
  drop = _DropFlaxNotice()
  handlers = list(logging.getLogger('diffusers').handlers) + list(logging.getLogger().handlers)
  for handler in handlers:
    handler.addFilter(drop)
  try:
    yield
  finally:
    for handler in handlers:
      handler.removeFilter(drop)


def silences_flax_notice(fn):
  """Decorator: `fn` runs within `flax_notice_silenced`."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with flax_notice_silenced():
      return fn(*args, **kwargs)
  return wrapped
