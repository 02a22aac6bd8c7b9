"""The package's import structure: every module imports on its own, the module-level import
graph has no cycle, and no function imports the package's own modules."""
import ast
import functools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed name -> folder (setup.cfg package_dir)
FOLDERS = {"sqs_pyro": ROOT / "sqs_pyro", "sqs_pyro.models": ROOT / "models", "sqs_pyro.guides": ROOT / "guides",
           "sqs_pyro.analysis": ROOT / "analysis"}


@functools.cache
def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    modules = {}
    for prefix, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            if prefix == "sqs_pyro" and parts and parts[0] in ("models", "guides", "analysis"):
                continue
            modules[name] = path
    return modules


def own_imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, ast.AST]]:
    """``(imported module, node)`` for every import of a ``sqs_pyro`` module in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.split(".")[0] == "sqs_pyro"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] == "sqs_pyro":
                subs = [f"{base}.{a.name}" for a in node.names]
                # ``from package import submodule`` depends on the submodule, not the package's __init__
                found += [(base, node)] if not all(sub in package_modules() for sub in subs) else []
                found += [(sub, node) for sub in subs]
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = {target for target, node in own_imports(tree, name, path.name == "__init__.py")
                       if node in top and target in modules and target != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_module_list_covers_the_whole_tree():
    names = package_modules()
    assert {"sqs_pyro.infer.trainer", "sqs_pyro.guides.spike_gmm", "sqs_pyro.analysis.report",
            "sqs_pyro.format.container", "sqs_pyro.cli.common"} <= set(names)
    assert len(names) > 50


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["sqs_pyro.config"] = graph["sqs_pyro.config"] | {"sqs_pyro.infer.trainer"}
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_no_function_imports_of_the_package_itself():
    offenders = []
    for name, path in package_modules().items():
        tree = ast.parse(path.read_text())
        checking = [n.body for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING"]
        top = {id(n) for n in tree.body} | {id(n) for body in checking for n in body}  # annotations only
        offenders += [f"{name}:{node.lineno}" for _, node in own_imports(tree, name, path.name == "__init__.py")
                      if id(node) not in top]
    assert offenders == []


def test_every_module_imports_on_its_own():
    """One fresh interpreter; before each module, every ``sqs_pyro`` module is forgotten."""
    code = (
        "import importlib, sys\n"
        "failed = []\n"
        f"for name in {sorted(package_modules())!r}:\n"
        "    for key in [k for k in sys.modules if k == 'sqs_pyro' or k.startswith('sqs_pyro.')]:\n"
        "        del sys.modules[key]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        failed.append(f'{name}: {exc!r}')\n"
        "print('\\n'.join(failed))\n"
        "sys.exit(1 if failed else 0)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
