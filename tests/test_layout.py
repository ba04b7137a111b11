"""The package's import graph: no module imports one that (directly or not) imports it back, and the
folders keep their roles (models know nothing of experiments; timm key maps stay numpy; imports go from
checkpoints_convert to vitsparse_jax only)."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("vitsparse_jax", "checkpoints_convert")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (any depth: `from a.b import c` counts a.b.c if that is a module),
    and the package faces it goes through: `from a.b import c` reads `c` from a.b's `__init__`, and importing
    a module from outside its package first runs the `__init__` of every package around it, so a face that
    imports its own modules is part of every loop through them."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        own = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 2)}
        faces = {".".join(d.split(".")[:i]) for d in deps for i in range(1, d.count(".") + 1)} - own
        graph[mod] = {d for d in deps | faces if d in files and d != mod}
    return graph


def test_no_import_cycles_between_modules():
    graph = import_graph()
    state: dict[str, int] = {}

    def visit(mod: str, path: list[str]) -> None:
        state[mod] = 1
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep] if dep in path else [mod, dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, path + [dep])
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod, [mod])


def test_folders_keep_their_roles():
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("vitsparse_jax.models"):
            assert all(d.startswith("vitsparse_jax.models") for d in deps), (mod, deps)
        if mod.startswith(("vitsparse_jax.weights", "vitsparse_jax.data", "vitsparse_jax.runtime")):
            assert not any(d.startswith("vitsparse_jax.experiments") for d in deps), (mod, deps)


def test_each_experiment_stands_alone():
    """Importing one experiment imports no other (shared code lives in measures/, runtime/, ...); no module of a
    measurement experiment deals with processes (runtime.parallel: the driver decides who writes). Training
    keeps its own loop (`contract.Standalone`)."""
    graph = import_graph()

    def reach(mod: str) -> set[str]:
        seen, todo = set(), [mod]
        while todo:
            for dep in graph[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        return seen

    names = sorted({m.split(".")[2] for m in graph
                    if m.startswith("vitsparse_jax.experiments.") and m.count(".") >= 3})
    for name in names:
        own = f"vitsparse_jax.experiments.{name}"
        modules = [m for m in graph if m == own or m.startswith(own + ".")]
        for mod in modules:
            others = {d for d in reach(mod) if d.startswith("vitsparse_jax.experiments.") and d.count(".") >= 2
                      and d.split(".")[2] in names and d.split(".")[2] != name}
            assert not others, (mod, others)
            if name != "train":
                assert "vitsparse_jax.runtime.parallel" not in graph[mod], mod
    assert "vitsparse_jax.experiments.sparsity" in {f"vitsparse_jax.experiments.{n}" for n in names}


def test_imports_between_packages_go_one_way():
    """checkpoints_convert (torch-facing CLI) -> vitsparse_jax, never back: no static import, and no import
    by name (importlib / __import__ with a 'checkpoints_convert' string) anywhere in vitsparse_jax."""
    graph = import_graph()
    back = {mod: deps for mod, deps in graph.items()
            if mod.startswith("vitsparse_jax") and any(d.startswith("checkpoints_convert") for d in deps)}
    assert not back, back
    for path in (ROOT / "vitsparse_jax").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(isinstance(a, (ast.Constant, ast.JoinedStr)) and
                                                  "checkpoints_convert" in ast.unparse(a) for a in node.args):
                name = ast.unparse(node.func)
                assert "import" not in name, f"{path}: {ast.unparse(node)}"


def test_timm_key_maps_live_in_the_package():
    from vitsparse_jax import models
    from vitsparse_jax.weights.timm_keys import KEY_MAPS

    families = {models.model_info(models.create_model(name)).family
                for name in ("vit_pico_patch4_32", "vgg_pico", "resnet18", "swin_tiny_patch4_window7_224",
                             "convnext_tiny")}
    assert families <= set(KEY_MAPS), families - set(KEY_MAPS)
