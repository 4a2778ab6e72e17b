"""The package's shape: what ComfyUI sees, and what the host-free core may import."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import ultrares

REPO_ROOT = Path(ultrares.__file__).resolve().parent
HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "nodes",
                "node_helpers", "server", "execution")


def _imported_top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_comfyui_finds_a_v3_entrypoint_and_no_v1_mappings():
    # ComfyUI treats a module with NODE_CLASS_MAPPINGS as V1 and ignores comfy_entrypoint.
    assert inspect.iscoroutinefunction(ultrares.comfy_entrypoint)
    assert not hasattr(ultrares, "NODE_CLASS_MAPPINGS")


def test_core_source_never_imports_the_host():
    offenders = []
    for folder in ("kernels", "models"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            bad = _imported_top_level_names(path) & set(HOST_MODULES)
            if bad:
                offenders.append(f"{path.relative_to(REPO_ROOT)} imports {sorted(bad)}")
    assert not offenders, "kernels/ and models/ must stay free of ComfyUI imports:\n" + "\n".join(offenders)


@pytest.fixture(scope="module")
def two_copies_of_the_core() -> dict:
    """In a fresh process: the core imported as ``ultrares``, then again under the path-like name
    ComfyUI's loader gives a custom node's module; what that process saw, as JSON."""
    script = (
        "import importlib, importlib.util, json, sys, pkgutil, torch\n"
        "def load(name, walk):\n"
        f"    spec = importlib.util.spec_from_file_location(name, {str(REPO_ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(REPO_ROOT)!r}])\n"
        "    m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m)\n"
        "    for pkg in (name + '.kernels', name + '.models')[:2 if walk else 1]:\n"
        "        p = importlib.import_module(pkg)\n"
        "        for info in pkgutil.walk_packages(p.__path__, pkg + '.') if walk else ():\n"
        "            importlib.import_module(info.name)\n"
        "load('ultrares', walk=True)\n"
        f"host = {HOST_MODULES!r}\n"
        "loaded = sorted(n for n in sys.modules if n.split('.')[0] in host)\n"
        "load('/custom_nodes/ComfyUI-UltraRes', walk=False)  # the ops register when kernels is imported\n"
        "from ultrares.kernels import circular_window_attention\n"
        "q = torch.randn(1, 2, 4 + 12, 8)\n"
        "first = circular_window_attention(q, q, q, grid=(3, 4), n_txt=4, radius=2)\n"
        "second = importlib.import_module('/custom_nodes/ComfyUI-UltraRes.kernels').circular_window_attention(\n"
        "    q, q, q, grid=(3, 4), n_txt=4, radius=2)\n"
        "ops = sorted(name for name in dir(torch.ops.ultrares) if not name.startswith('_'))\n"
        "print(json.dumps({'host_modules': loaded, 'ops': ops, 'same': bool(torch.equal(first, second))}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_core_loads_nothing_from_comfyui(two_copies_of_the_core):
    assert two_copies_of_the_core["host_modules"] == []


def test_a_second_copy_of_the_pack_registers_its_own_ops_and_leaves_the_first_copys_working(two_copies_of_the_core):
    # ComfyUI imports the pack by path while tests (and command lines) import it as ultrares: a
    # custom op registered again under the same name would destroy the first copy's operator.
    ops = set(two_copies_of_the_core["ops"])
    for op in ("clear_window_attention", "clear_window_attention_backward", "gspn_scan", "gspn_scan_backward"):
        assert {op, f"{op}_2"} <= ops, op
    assert two_copies_of_the_core["same"]


def _packages_with_a_public_api() -> dict[str, object]:
    """The host-free packages that state their public API (``__all__``), by dotted name."""
    packages = {}
    for init in sorted(init for folder in ("kernels", "models", "benchmarks") for init in
                       (REPO_ROOT / folder).rglob("__init__.py")):
        parts = init.parent.relative_to(REPO_ROOT).parts
        module = importlib.import_module(".".join(("ultrares", *parts)))
        if hasattr(module, "__all__"):
            packages[module.__name__] = module
    return packages


def test_a_public_api_names_objects_that_say_what_they_are():
    packages = _packages_with_a_public_api()
    assert "ultrares.models.infdit" in packages
    undocumented = []
    for name, package in packages.items():
        assert len(set(package.__all__)) == len(package.__all__), f"{name}.__all__ lists a name twice"
        for public in package.__all__:
            obj = getattr(package, public)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                doc = inspect.getdoc(obj) or ""
                # A dataclass without a docstring gets its signature as one.
                if not doc.strip() or doc.startswith(f"{obj.__name__}("):
                    undocumented.append(f"{name}.{public}")
    assert not undocumented, "public names without a docstring: " + ", ".join(undocumented)


IMPORTED_THROUGH_THEIR_API = ("ultrares.kernels", "ultrares.models", "ultrares.models.clear", "ultrares.models.gspn",
                              "ultrares.models.infdit", "ultrares.models.training", "ultrares.benchmarks")
"""Host-free packages that the rest of the pack imports only through their ``__all__``."""
CALLERS = {"nodes": IMPORTED_THROUGH_THEIR_API, "cli": IMPORTED_THROUGH_THEIR_API, "models": ("ultrares.kernels",)}
"""Folder -> the packages it may import only through their public API (the ComfyUI glue and the
command lines: all of them; the networks: the ops)."""


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``, relative imports resolved to ``ultrares.*``."""
    package = ["ultrares", *path.parent.relative_to(REPO_ROOT).parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
    return found


@pytest.mark.parametrize("folder", list(CALLERS))
def test_packages_are_imported_only_through_their_public_api(folder):
    packages = {name: importlib.import_module(name) for name in CALLERS[folder]}
    assert all(hasattr(package, "__all__") for package in packages.values())
    offenders = []
    for path in sorted((REPO_ROOT / folder).rglob("*.py")):
        where = path.relative_to(REPO_ROOT)
        for module, names in _imports(path):
            owners = [name for name in packages if module == name or module.startswith(name + ".")]
            if not owners:
                continue
            owner = max(owners, key=len)
            if module != owner:
                offenders.append(f"{where} imports {module}, not {owner}'s public API")
            offenders += [f"{where} imports {name}, not in {owner}.__all__"
                          for name in names if name not in packages[owner].__all__]
    assert not offenders, "\n".join(offenders)


def test_every_package_directory_is_installed():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    declared = set(config["tool"]["setuptools"]["packages"])
    on_disk = {
        ".".join(("ultrares", *init.parent.relative_to(REPO_ROOT).parts))
        for init in REPO_ROOT.rglob("__init__.py")
        if not ({"tests", ".git", "build"} & set(init.relative_to(REPO_ROOT).parts))
        and not any(part.startswith(".") for part in init.relative_to(REPO_ROOT).parts)
    }
    assert on_disk == declared


def test_requirements_never_pull_a_second_torch():
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    runtime = [*config["project"]["dependencies"],
               *(REPO_ROOT / "requirements.txt").read_text().splitlines()]
    names = {line.split(";")[0].strip().split("=")[0].split(">")[0].split("<")[0].split("[")[0].lower()
             for line in runtime if line.strip() and not line.lstrip().startswith("#")}
    assert not names & {"torch", "torchvision", "torchaudio", "triton"}


INTERNAL_ERRORS = {"ultrares.models.infdit.exchange.Stopped"}
"""Errors that never leave the pack: a rank's signal that the run was stopped elsewhere."""


def _pack_errors() -> dict[str, type]:
    import pkgutil

    errors = {}
    for package in ("ultrares.kernels", "ultrares.models"):
        for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
            module = importlib.import_module(info.name)
            for obj in vars(module).values():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and module.__name__ in (
                        obj.__module__, getattr(obj, "defined_in", None)):
                    errors[f"{module.__name__}.{obj.__qualname__}"] = obj
    return errors


def test_every_error_a_user_may_see_is_shown_by_its_bare_name_and_still_pickles():
    import pickle

    from ultrares.errors import NamedError

    errors = _pack_errors()
    assert {"ultrares.models.infdit.files.InfDiTCheckpointError", "ultrares.models.clear.stripes.StripeError",
            "ultrares.kernels._clear_triton.KernelCannotRun"} <= set(errors)
    for name, error in errors.items():
        if name in INTERNAL_ERRORS:
            continue
        # ComfyUI's dialog shows module.qualname unless the module is builtins.
        assert issubclass(error, NamedError) and error.__module__ == "builtins", name
        copy = pickle.loads(pickle.dumps(error("why")))
        assert type(copy) is error and copy.args == ("why",), name
