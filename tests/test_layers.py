"""The floor plan, kept: the package's own imports (read from its source, lazy ones and
TYPE_CHECKING ones included) form no cycle, and no layer imports a layer above it.

The layers, bottom to top. A module may import its own package and any package below it.
Packages on one row are independent: neither imports the other.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [
    ["common"],  # errors, the directory lease, the metrics.jsonl format, the callback hooks
    ["config"],  # one dataclass per section, the raw-input checks
    ["data", "model"],  # text -> shards -> sampler; GPT, Llama, loss, FLOP and memory arithmetic
    ["parallel"],  # launcher ranks, batch arithmetic, collectives, tensor parallelism
    ["checkpoint", "monitor"],  # save, verify, load, reshard; the spike detector and replay
    ["callbacks"],  # loggers, W&B, evaluator, spike monitor, throughput
    ["train"],  # DeepSpeed JSON, engine, loop, run directory, `harness train`
    ["after", "plan", "slurm"],  # eval, sample, export; `harness plan`; sbatch and submit
    ["smoke"],  # `harness smoke`: train, resume, export and reload, checked (CI)
    ["cli"],  # the `harness` command
]
RANK = {pkg: i for i, row in enumerate(LAYERS) for pkg in row}
ROW = {pkg: tuple(row) for row in LAYERS for pkg in row}


def modules() -> dict[str, Path]:
    found = {}
    for path in (ROOT / "harness").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The harness modules `name` imports, wherever in the file the import sits."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from harness.x import y`: y may be a module of its own
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(name, path, set(found)) for name, path in found.items()}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "common"  # `harness` itself: __version__ only


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), as sorted names."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_package_has_a_layer_and_a_docstring():
    packages = {p.name for p in (ROOT / "harness").iterdir() if (p / "__init__.py").is_file()}
    top = {p.stem for p in (ROOT / "harness").glob("*.py")} - {"__init__"}
    assert set(RANK) == packages | top, "a package without a layer, or a stale row"
    for pkg in packages:
        doc = ast.get_docstring(ast.parse((ROOT / "harness" / pkg / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), (
            f"harness/{pkg}/__init__.py: say what it holds and imports")


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_layers_only_point_down():
    upward = []
    for module, deps in sorted(graph().items()):
        mine = package_of(module)
        for dep in sorted(deps):
            theirs = package_of(dep)
            if theirs == mine:
                continue
            if RANK[theirs] > RANK[mine] or (RANK[theirs] == RANK[mine]):
                upward.append(f"{module} -> {dep} ({mine} may not import {theirs})")
    assert upward == []


def test_the_checks_catch_what_they_are_for():
    # the reference: a made-up graph with one cycle and one upward arrow
    edges = {"harness.config.a": {"harness.train.b"}, "harness.train.b": {"harness.config.a"},
             "harness.model.c": set()}
    assert cycles(edges) == [["harness.config.a", "harness.train.b"]]
    assert RANK[package_of("harness.train.b")] > RANK[package_of("harness.config.a")]


def test_no_module_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "harness").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def walk(start: str = "harness.train.run") -> tuple[set[str], list[str]]:
    """The modules `harness train` enters (imports, transitively, from its module) and the
    arrows among them that climb to a higher layer."""
    edges, seen, todo = graph(), set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(edges[module])
    climbs = [f"{a} -> {b}" for a in sorted(seen) for b in sorted(edges[a])
              if RANK[package_of(b)] > RANK[package_of(a)]]
    return seen, climbs


if __name__ == "__main__":  # the floor plan, printed: python tests/test_layers.py
    found = modules()
    for row in LAYERS:
        for pkg in row:
            mods = [m for m in found if package_of(m) == pkg]
            lines = sum(len(found[m].read_text().splitlines()) for m in mods)
            print(f"layer {RANK[pkg]}  {pkg:<11} {len(mods):>3} modules {lines:>6} lines")
    longest = max(found, key=lambda m: len(found[m].read_text().splitlines()))
    print(f"longest: {found[longest].relative_to(ROOT)} "
          f"({len(found[longest].read_text().splitlines())} lines)")
    rooms, climbs = walk()
    print(f"`harness train` enters {len(rooms)} modules; {len(climbs)} arrows climb a layer")
    print(f"cycles: {cycles(graph())}")
