"""The import graph of the package follows docs/architecture.md: lower layers never import higher ones,
and no module imports another's private names."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "randlora"

# docs/architecture.md, "Layers: who may import whom" (a unit is a top-level module or subpackage)
LAYER = {"errors": 0, "hub": 1, "instructions": 1, "results": 1,
         "adapters": 1, "buffers": 2, "compile": 2, "analysis": 2,
         "models": 3, "data": 3,
         "tasks": 4, "report": 4,
         "training": 5,
         "train": 6, "export": 6, "pretrain": 6}
# beyond the layer rule: the library imports nothing of the package; the two layer-3 units never import each
# other; the layer-2 utilities use the library only; the report reads results.json files, whatever wrote them
ALLOWED = {"adapters": set(), "buffers": {"adapters"}, "compile": {"adapters"}, "analysis": {"adapters"},
           "models": {"errors", "hub", "instructions", "results"}, "data": {"errors", "hub", "instructions", "results"},
           "report": {"results", "adapters"}}


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported module, names, line) of every randlora import in ``path`` (also inside functions)."""
    mod = _module(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "randlora":
                yield target, [a.name for a in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "randlora":
                    yield a.name, [], node.lineno


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _files():
    return [p for p in PACKAGE.rglob("*.py") if "bundled" not in p.parts]


def test_every_unit_has_a_layer():
    units = {_unit(_module(p)) for p in _files()} - {""}
    assert units <= set(LAYER), f"add {units - set(LAYER)} to docs/architecture.md and LAYER"


def test_lower_layers_never_import_higher_ones():
    bad = []
    for path in _files():
        src = _unit(_module(path))
        for target, names, line in _imports(path):
            dst = _unit(target)
            if not src or not dst or dst == src:
                continue
            if dst == "" and names:  # from randlora import x
                dst = names[0]
            allowed = ALLOWED.get(src)
            ok = dst in allowed if allowed is not None else LAYER.get(dst, 99) < LAYER.get(src, 99)
            if not ok:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {src} imports {target}")
    assert bad == [], "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{path.relative_to(ROOT)}:{line}: from {target} import {n}"
           for path in _files() for target, names, line in _imports(path)
           for n in names if n.startswith("_") and not n.startswith("__")]
    assert bad == [], "\n".join(bad)


def test_the_adapter_library_needs_only_its_declared_dependencies():
    """``pip install randlora`` (no extra) gives a working ``randlora.adapters``: every third-party module
    the library imports is a core dependency in pyproject.toml, and nothing else is one."""
    import sys
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    core = {d.split(">")[0].split("<")[0].split("=")[0].strip() for d in deps}
    assert core == {"torch", "safetensors", "numpy"}
    third_party = set()
    for path in (PACKAGE / "adapters").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else []
            third_party |= {n.split(".")[0] for n in names}
    third_party -= set(sys.stdlib_module_names) | {"randlora", "__future__"}
    assert third_party <= core, f"the library imports {third_party - core}, which the core install lacks"


def test_no_test_module_imports_another():
    """Shared test code lives in helper modules (tests/helpers.py, tests/tiny_models.py, ...), never in a
    test_*.py file: importing one test module from another runs its collection side effects twice."""
    found = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.name}:{node.lineno} imports {n}" for n in names
                      if n.startswith("tests.test_") or n.startswith("test_")]
    assert found == []


# ------------------------------------------------------------------------------ benchmarks and experiments
# docs/architecture.md, "Benchmarks and experiments": they build their models, adapters and tables through
# the framework and the library; an nn.Module of their own only where the library has no such thing
OUTSIDE = ("benchmarks", "experiments")
OWN_MODULES = {("experiments/cpu_repro/matrix.py", "RandSum"):
               "E2's RandLoRA-a / -b ablation variants (paper §6.3), which the adapter library does not implement"}
MODEL_CLASSES = ("CLIP", "CustomTextCLIP", "VisionTransformer")
ZOO_FACTORIES = ("create_model", "create_model_and_transforms", "create_model_from_pretrained")


def _outside_files():
    return sorted(p for d in OUTSIDE for p in (ROOT / d).rglob("*.py"))


def _dotted(node) -> list[str]:
    """The names of a call's callee, outermost last: ``timm.create_model`` -> ["timm", "create_model"]."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
    return names[::-1]


def _is_model_class(name: str) -> bool:
    return name in MODEL_CLASSES or name.endswith("ForCausalLM") or name.startswith("AutoModel")


def test_benchmarks_and_experiments_define_no_module_of_their_own():
    found = []
    for path in _outside_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(_dotted(b)[-1:] == ["Module"] for b in node.bases):
                key = (str(path.relative_to(ROOT)), node.name)
                if key not in OWN_MODULES:
                    found.append(f"{key[0]}:{node.lineno}: class {node.name}(nn.Module)")
    assert found == [], ("build networks through randlora.models / randlora.training.build (model_network), "
                         "or add the class to OWN_MODULES with the reason the library has no such thing:\n"
                         + "\n".join(found))
    here = {(str(p.relative_to(ROOT)), n.name) for p in _outside_files()
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef)}
    assert set(OWN_MODULES) <= here, f"stale OWN_MODULES entries: {set(OWN_MODULES) - here}"


def test_benchmarks_and_experiments_build_no_model_of_their_own():
    """No model zoo constructor (timm / open_clip ``create_model``, ``CLIP(...)``, ``*ForCausalLM``,
    ``AutoModel*``) outside the framework's builders: a benchmark measures, and an experiment trains, what
    ``train.py`` builds."""
    found = []
    for path in _outside_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                names = _dotted(node.func)
                if (names and names[-1] in ZOO_FACTORIES) or any(_is_model_class(n) for n in names):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {'.'.join(names)}(...)")
    assert found == [], "\n".join(found)


def test_benchmarks_and_experiments_import_no_private_names():
    """They use the package's public API (and each other's): no ``from x import _name``, nothing from the
    test suite (a benchmark composes its config as the framework does); the package itself never imports
    them."""
    bad = []
    for path in _outside_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                bad += [f"{path.relative_to(ROOT)}:{node.lineno}: from {'.' * node.level}{node.module or ''} "
                        f"import {a.name}" for a in node.names if a.name.startswith("_")]
            modules = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                       else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {m}" for m in modules
                    if m.split(".")[0] == "tests"]
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            bad += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {n}" for n in names
                    if n.split(".")[0] in OUTSIDE]
    assert bad == [], "\n".join(bad)
