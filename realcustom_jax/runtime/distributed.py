"""Multi-process start-up, the peer watchdog and barriers (TPU pods, multi-host GPU).

Call
`initialize_distributed(config)` before anything touches a JAX backend (train/main.py
does it when `config.mesh.distributed` is True). The cluster comes from
JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID when they are set, else
from JAX's own detection (TPU metadata, SLURM, Open MPI, Kubernetes).

Failures end the run instead of hanging: a start-up that does not complete (coordinator
unreachable, a process missing) and a peer that stops sending heartbeats mid-run each
print one `error:` line and exit the process (`PeerWatchdog`).
"""
import os
import socket
import sys
import threading
import time
from typing import Mapping, Optional

import jax

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
EXIT_STARTUP = 2  # the cluster could not be formed: most often an address or count mistake
EXIT_PEER_LOST = 1  # a peer died or hung mid-run
_KV_PREFIX = 'realcustom_watchdog'


class DistributedError(RuntimeError):
  """The multi-process runtime could not start; the message is one line."""


def _fail_now(message: str, code: int) -> None:
  """Prints one `error:` line and ends the process at once.

  Used from watchdog threads: the main thread may be blocked inside a collective or a
  C++ connect that Python cannot interrupt, and JAX's own handling of the same failure
  is an abort with a stack trace. `os._exit` also skips `jax.distributed.shutdown`,
  whose barrier would wait for the peer that is gone.
  """
  print(f'error: {message}', file=sys.stderr, flush=True)
  os._exit(code)  # pylint: disable=protected-access


def cluster_from_env(environ: Optional[Mapping[str, str]] = None) -> dict:
  """Coordinator address, process count and id from the environment; {} when unset.

  Args:
    environ: defaults to `os.environ`.

  Returns:
    kwargs for `jax.distributed.initialize`. JAX itself reads only the address from
    the environment; the count and id it otherwise takes from a detected cluster.

  Raises:
    DistributedError: the count or id is not an integer, only one of them is set, or
      the id is out of range.
  """
  environ = os.environ if environ is None else environ
  out = {}
  if environ.get(ENV_COORDINATOR):
    out['coordinator_address'] = environ[ENV_COORDINATOR]
  given = [k for k in (ENV_NUM_PROCESSES, ENV_PROCESS_ID) if environ.get(k)]
  if len(given) == 1:
    missing = ({ENV_NUM_PROCESSES, ENV_PROCESS_ID} - set(given)).pop()
    raise DistributedError(f'{given[0]} is set but {missing} is not; set both (or '
                           'neither, on a cluster JAX detects itself)')
  if given:
    try:
      num, pid = int(environ[ENV_NUM_PROCESSES]), int(environ[ENV_PROCESS_ID])
    except ValueError:
      raise DistributedError(f'{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} must be integers, '
                             f'got {environ[ENV_NUM_PROCESSES]!r} and '
                             f'{environ[ENV_PROCESS_ID]!r}') from None
    if not 0 <= pid < num:
      raise DistributedError(f'{ENV_PROCESS_ID}={pid} must lie in [0, '
                             f'{ENV_NUM_PROCESSES}={num})')
    out.update(num_processes=num, process_id=pid)
  return out


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
  """Whether a TCP connection to `host:port` opens (only used to word an error)."""
  host, _, port = address.rpartition(':')
  try:
    with socket.create_connection((host.strip('[]'), int(port)), timeout=timeout_s):
      return True
  except (OSError, ValueError):
    return False


def _startup_timed_out(cluster: dict, timeout_s: float) -> None:
  """Timer callback: the cluster did not form in time; says why in one line, exits 2."""
  address = cluster.get('coordinator_address')
  pid = cluster.get('process_id')
  who = 'this process' if pid is None else f'process {pid}'
  if pid != 0 and address and not _reachable(address):
    _fail_now(f'{who}: cannot reach the coordinator at {address} within {timeout_s:g}s '
              f'(check {ENV_COORDINATOR} and that process 0 runs)', EXIT_STARTUP)
  count = cluster.get('num_processes')
  _fail_now(f'{who}: the {str(count) + " " if count else ""}processes did not all '
            f'join the coordinator{" at " + address if address else ""} within '
            f'{timeout_s:g}s (check {ENV_NUM_PROCESSES} and that every process started)',
            EXIT_STARTUP)


def initialize_distributed(config, *, init_timeout_s: float = 300,
                           peer_timeout_s: float = 60) -> Optional['PeerWatchdog']:
  """Starts the multi-process runtime when `config.mesh.distributed` is True.

  Must run before the first JAX computation. Without `config.mesh.distributed` it does
  nothing. The cluster comes from `cluster_from_env`, else from JAX's detection.

  Args:
    config: reads `config.mesh.distributed`.
    init_timeout_s: every process must have joined within this time; otherwise this
      process prints one line and exits with status 2.
    peer_timeout_s: a peer silent for this long mid-run ends this process with one
      line and status 1 (see `PeerWatchdog`).

  Returns:
    The started `PeerWatchdog` (call `finish()` after a successful run), or None on a
    single process.

  Raises:
    DistributedError: no cluster is configured or detected, or the environment is
      inconsistent.
  """
  if not config.mesh.get('distributed', False):
    return None
  cluster = cluster_from_env()
  # JAX aborts the process (SIGABRT and a C++ stack trace) when its own start-up
  # timeout passes; this timer fires first and says what is missing in one line.
  timer = threading.Timer(init_timeout_s, _startup_timed_out, (cluster, init_timeout_s))
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(
        **cluster, initialization_timeout=int(init_timeout_s) + 30,
        # JAX's own peer check ends in an abort; ours reports first.
        heartbeat_timeout_seconds=int(2 * peer_timeout_s) + 10,
        # At exit, how long a finished process waits for the others to finish.
        shutdown_timeout_seconds=int(peer_timeout_s) + 30)
  except (ValueError, TypeError, RuntimeError) as e:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if 'coordinator_address' in text or 'must be defined' in text:
      text = (f'config.mesh.distributed is True but no cluster was found: set '
              f'{ENV_COORDINATOR}, {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or run on a '
              f'TPU pod, SLURM or Open MPI, which JAX detects)')
    raise DistributedError(text) from None
  finally:
    timer.cancel()
  watchdog = PeerWatchdog(jax.process_index(), jax.process_count(), peer_timeout_s)
  watchdog.start()
  return watchdog


def _distributed_client():
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  # The coordination service's key-value store: the same client orbax's barriers use.
  return distributed.global_state.client


class PeerWatchdog:
  """Ends this process with one line when a peer stops heartbeating or the coordinator
  goes away.

  Each process bumps a counter in the coordination service's key-value store every
  `timeout_s / 5` seconds and reads everyone's. A peer whose counter has not moved for
  `timeout_s` (measured on this host's clock, so clocks need not agree) is dead or
  hung: without this, the survivors would block in the next collective until JAX's
  heartbeat check aborts them with a C++ stack trace. A peer that finished (`finish`)
  is no longer watched.

  The counter runs in a Python thread: a process stuck in Python code that never
  releases the GIL would look dead too, hence a generous default timeout.
  """

  def __init__(self, process_id: int, num_processes: int, timeout_s: float, client=None):
    self.process_id, self.num_processes = process_id, num_processes
    self.timeout_s = float(timeout_s)
    self._interval = min(max(self.timeout_s / 5, 0.2), 5.0)
    self._client = client
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='peer-watchdog', daemon=True)

  def start(self) -> None:
    if self._client is None:
      self._client = _distributed_client()
    self._thread.start()

  def finish(self) -> None:
    """Marks this process as done (peers stop watching it) and stops the thread."""
    try:
      self._client.key_value_set(f'{_KV_PREFIX}/done/{self.process_id}', '1',
                                 allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except
      pass  # the coordinator is already gone: nobody is left to tell
    self.stop()

  def wait_for_verdict(self) -> None:
    """Gives the thread time to notice a dead peer (it then ends the process).

    Call when the main thread caught a runtime error: a collective whose peer died
    fails here first (gloo: connection closed), and the one-line diagnosis is the
    watchdog's. Returns when every peer is still beating after `timeout_s`.
    """
    if self._thread.is_alive():
      self._thread.join(timeout=self.timeout_s + 2 * self._interval)

  def stop(self) -> None:
    self._stop.set()
    if self._thread.is_alive() and threading.current_thread() is not self._thread:
      self._thread.join(timeout=2 * self._interval + 1)

  def _run(self) -> None:
    beat = 0
    last = {p: (None, time.monotonic()) for p in range(self.num_processes)
            if p != self.process_id}
    while not self._stop.wait(self._interval):
      beat += 1
      try:
        self._client.key_value_set(f'{_KV_PREFIX}/alive/{self.process_id}', str(beat),
                                   allow_overwrite=True)
        entries = dict(self._client.key_value_dir_get(_KV_PREFIX))
      except Exception as e:  # pylint: disable=broad-except
        if self._stop.is_set():
          return
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        _fail_now(f'process {self.process_id}: lost the coordinator (process 0 ended or '
                  f'the network failed): {first}', EXIT_PEER_LOST)
        return
      now = time.monotonic()
      for peer, (value, since) in list(last.items()):
        if any(k.endswith(f'done/{peer}') for k in entries):
          del last[peer]
          continue
        current = next((v for k, v in entries.items() if k.endswith(f'alive/{peer}')), None)
        if current != value:
          last[peer] = (current, now)
        elif now - since > self.timeout_s and not self._stop.is_set():
          _fail_now(f'process {self.process_id}: process {peer} sent no heartbeat for '
                    f'{self.timeout_s:g}s (it died or hangs); ending the run',
                    EXIT_PEER_LOST)
          return


def barrier(name: str, timeout_s: float) -> None:
  """Blocks until every process reaches the barrier `name`; no-op on one process.

  Uses the coordination service (no device collective), so a long wait, e.g. while
  process 0 prepares the data set, needs no device and keeps the heartbeats going.

  Raises:
    jax.errors.JaxRuntimeError: not every process arrived within `timeout_s`.
  """
  if jax.process_count() == 1:
    return
  _distributed_client().wait_at_barrier(name, int(timeout_s * 1000))
