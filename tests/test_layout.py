"""The layout's rules, read from the source: no import cycle in the package, the core never
imports the release port, nothing ships that imports the toy world or the tests, and
importing the library leaves the user's logging alone."""
import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'realcustom_jax'
PORT = 'realcustom_jax.release'
# The one module that knows both pipelines (`load_pipeline`): above the core and the port.
DOOR = 'realcustom_jax.pipelines'
# What ships (setup.cfg) and may not lean on an add-on or the tests.
SHIPPED = ('realcustom_jax', 'train', 'sample', 'configs', 'benchmarks')


def modules(root: str, package: str) -> dict[str, str]:
  """Dotted module name -> file, for every .py file of `package` under `root`."""
  found = {}
  for folder, _, files in os.walk(os.path.join(root, package)):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
        found[dotted[:-len('.__init__')] if dotted.endswith('.__init__') else dotted] = path
  return found


def imported_names(path: str) -> set[str]:
  """Every absolute module name a file imports, at the top or inside functions (a lazy
  import is a dependency too), `from a import b` counted as both a and a.b."""
  names = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def import_graph(root: str, package: str) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (packages' __init__ included)."""
  mods = modules(root, package)
  return {m: {n for n in imported_names(path) if n in mods and n != m}
          for m, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import cycle as [a, b, ..., a], or [] when there is none (depth-first)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph[node]):
      if state.get(dep) == 'open':
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        cycle = visit(dep)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 'done'
    return []

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return []


def levels(graph: dict[str, set[str]]) -> int:
  """The longest import chain (a module importing nothing of the package is level 1)."""
  memo = {}

  def level(node):
    if node not in memo:
      memo[node] = 1 + max((level(d) for d in graph[node]), default=0)
    return memo[node]

  return max(level(n) for n in graph)


def core_imports_of_the_port(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """(core module, port module) pairs: the rule the layout exists for."""
  in_port = lambda m: m == PORT or m.startswith(PORT + '.')
  return sorted((m, d) for m, deps in graph.items() if not in_port(m) and m != DOOR
                for d in deps if in_port(d))


def test_the_package_has_no_import_cycle():
  graph = import_graph(REPO, PACKAGE)
  assert len(graph) > 30
  assert find_cycle(graph) == []
  assert levels(graph) <= 13


def test_the_core_never_imports_the_release_port():
  graph = import_graph(REPO, PACKAGE)
  assert core_imports_of_the_port(graph) == []
  # ...while the port builds on the core, and the door knows both.
  assert 'realcustom_jax.model' in graph['realcustom_jax.release.convert']
  assert {'realcustom_jax.release.family', 'realcustom_jax.paper_family'} <= graph[DOOR]


def test_nothing_shipped_imports_the_toy_world_or_the_tests():
  offenders = []
  for package in SHIPPED:
    for module, path in modules(REPO, package).items():
      for name in imported_names(path):
        if name.split('.')[0] in ('toy', 'tests'):
          offenders.append((module, name))
  assert offenders == []


def test_the_checks_catch_what_they_guard(tmp_path):
  """The same functions on a made-up package with a cycle and a core -> port import."""
  pkg = tmp_path / PACKAGE
  (pkg / 'release').mkdir(parents=True)
  files = {'__init__.py': '', 'a.py': 'from realcustom_jax import b\n',
           'b.py': 'def f():\n  from realcustom_jax import a\n',  # lazy, still a cycle
           'c.py': 'from realcustom_jax.release import port\n',
           'release/__init__.py': '', 'release/port.py': 'from realcustom_jax import c\n'}
  for name, text in files.items():
    (pkg / name).write_text(text)
  graph = import_graph(str(tmp_path), PACKAGE)
  cycle = find_cycle(graph)
  assert cycle[0] == cycle[-1] and {'realcustom_jax.a', 'realcustom_jax.b'} <= set(cycle)
  assert ('realcustom_jax.c', 'realcustom_jax.release.port') in core_imports_of_the_port(graph)
  assert levels({'x': {'y'}, 'y': {'z'}, 'z': set()}) == 3


def test_importing_the_library_keeps_the_users_logging():
  """Every module of the package imported: a program's own diffusers / transformers log
  levels survive (the CLIs quiet both in their `main`: `cli.quiet_libraries`)."""
  names = sorted(modules(REPO, PACKAGE))
  probe = ('import importlib, diffusers, transformers\n'
           'd, t = diffusers.utils.logging, transformers.logging\n'
           'd.set_verbosity_info(); t.set_verbosity_info()\n'
           f'for name in {names!r}:\n'
           '  importlib.import_module(name)\n'
           'print(d.get_verbosity(), t.get_verbosity())\n')
  env = {k: v for k, v in os.environ.items() if k != 'USE_TORCH'}
  proc = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                        timeout=300, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split()[-2:] == ['20', '20']  # logging.INFO, both


# Modules that may name the release family: the door, the port, and the release's own
# command line (its checkpoint converter).
FAMILY_AWARE = (DOOR, 'sample.convert_release')


def family_tests(path: str) -> list[str]:
  """The places a file asks which family it holds (code only, not docstrings): a call
  of `is_release_config`, a comparison of a config's `pipeline` with 'release', or an
  `isinstance(..., ReleasePipeline)`."""
  source = open(path).read()
  found = []
  for node in ast.walk(ast.parse(source, path)):
    if isinstance(node, (ast.Name, ast.Attribute)):
      name = node.id if isinstance(node, ast.Name) else node.attr
      if name == 'is_release_config':
        found.append(f'{path}:{node.lineno} is_release_config')
    elif isinstance(node, ast.Compare):
      strings = [c.value for c in [node.left, *node.comparators]
                 if isinstance(c, ast.Constant)]
      if 'release' in strings and 'pipeline' in ast.get_source_segment(source, node):
        found.append(f'{path}:{node.lineno} pipeline == release')
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
          and node.func.id == 'isinstance' and 'ReleasePipeline' in ast.dump(node)):
      found.append(f'{path}:{node.lineno} isinstance ReleasePipeline')
  return found


def test_only_the_door_asks_which_family():
  offenders = []
  for package in SHIPPED:
    for module, path in modules(REPO, package).items():
      if module in FAMILY_AWARE or module == PORT or module.startswith(PORT + '.'):
        continue
      offenders += family_tests(path)
  assert offenders == []


def test_the_family_rule_catches_each_form(tmp_path):
  path = tmp_path / 'm.py'
  path.write_text('"""config.pipeline == \'release\' in a docstring is fine."""\n'
                  'a = paths.is_release_config(c)\n'
                  "b = c.get('pipeline') == 'release'\n"
                  'd = isinstance(p, release_pipeline.ReleasePipeline)\n'
                  "e = mode == 'release'\n")  # not the family: a sampler mode
  lines = sorted(int(f.rsplit(':', 1)[1].split()[0]) for f in family_tests(str(path)))
  assert lines == [2, 3, 4]
