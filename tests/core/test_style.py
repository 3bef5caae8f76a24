"""The two checks of DESIGN.md "Conventions", plus the core/family boundary and the size of core modules."""

import ast
import os

import pytest

from tests.conftest import REPO

FAMILY_PACKAGES = ("edm", "VAR", "xAR", "imm", "diffusers_family")
CODE_DIRS = ("neon",) + FAMILY_PACKAGES


def _modules(*dirs):
    for top in dirs:
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    yield os.path.relpath(path, REPO), ast.parse(open(path).read(), path)


def _calls_and_imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            yield f"{node.value.id}.{node.attr}"
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


FORBIDDEN_IO = {"torch.load", "torch.save", "pickle", "os.replace", "safetensors", "safetensors.torch"}


IO_PACKAGE = os.path.join("neon", "io") + os.sep


def test_only_the_io_package_does_file_io():
    offenders = [
        (path, name)
        for path, tree in _modules(*CODE_DIRS)
        if not path.startswith(IO_PACKAGE)
        for name in _calls_and_imports(tree)
        if name in FORBIDDEN_IO
    ]
    assert offenders == []
    inside = {
        name
        for path, tree in _modules("neon")
        if path.startswith(IO_PACKAGE)
        for name in _calls_and_imports(tree)
    }
    assert {
        "torch.load",
        "torch.save",
        "os.replace",
        "pickle",
    } <= inside  # the check looks where the calls are


MAX_LINES = 400  # a core module holds one job (STYLE.md): about 400 lines at most


def test_no_core_module_is_over_the_size_limit():
    sizes = {path: len(open(os.path.join(REPO, path)).read().splitlines()) for path, _ in _modules("neon")}
    assert len(sizes) > 20 and {p: n for p, n in sizes.items() if n > MAX_LINES} == {}


def test_family_modules_do_not_import_torch_distributed():
    family_files = [
        (p, t)
        for p, t in _modules(*CODE_DIRS)
        if p.startswith(FAMILY_PACKAGES) or p.startswith(os.path.join("neon", "toy"))
    ]
    assert family_files
    offenders = [
        (p, n) for p, t in family_files for n in _calls_and_imports(t) if n.startswith("torch.distributed")
    ]
    assert offenders == []


# `neon demo` is the toy's own verb, so the verb bodies may import the demo module (only that).
ALLOWED = {
    (os.path.join("neon", "verbs.py"), "neon.toy"),
    (os.path.join("neon", "verbs.py"), "neon.toy.demo"),
}


def test_core_never_imports_a_family_package():
    core = [(p, t) for p, t in _modules("neon") if not p.startswith(os.path.join("neon", "toy"))]
    offenders = [
        (p, n)
        for p, t in core
        for n in _calls_and_imports(t)
        if n.split(".")[0] in FAMILY_PACKAGES or n.startswith("neon.toy")
    ]
    assert set(offenders) <= ALLOWED and len(core) > 10


@pytest.mark.parametrize(
    "bad", ["import pickle", "torch.save(x, p)", "from torch.distributed import barrier"]
)
def test_the_checks_catch_violations(bad):
    names = set(_calls_and_imports(ast.parse(bad)))
    assert names & (FORBIDDEN_IO | {"torch.distributed", "torch.distributed.barrier"})


def test_no_family_is_named_in_the_core_text():
    """Issue 22's check, as text: `grep -rnE "\\bedm\\b\\.|VAR\\.|xAR\\.|imm\\." neon/` (the toy aside) finds
    nothing, in code, comments or strings."""
    import re

    pattern = re.compile(r"\bedm\b\.|VAR\.|xAR\.|imm\.")
    found = [
        (path, n)
        for path, _ in _modules("neon")
        if not path.startswith(os.path.join("neon", "toy"))
        for n, line in enumerate(open(os.path.join(REPO, path)), 1)
        if pattern.search(line)
    ]
    assert found == []
