"""Dependencies declared as used: every third-party module src/ imports is declared in pyproject.toml, every declared
dependency is imported, and lower bounds stay at or above what the code needs.

A module is found by parsing the source (ast), not by importing it, so an import inside a function counts too.
The standard library (sys.stdlib_module_names) and the project's own package (src) are not dependencies.
"""
import ast
import functools
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Import name -> distribution where the installed packages cannot tell (a package not installed here); the
# installed metadata (importlib.metadata.packages_distributions) is asked first.
IMPORT_TO_DISTRIBUTION = {"yaml": "PyYAML", "pynvml": "nvidia-ml-py", "sklearn": "scikit-learn", "hydra": "hydra-core",
                          "psycopg2": "psycopg2-binary", "PIL": "pillow"}

# The oldest version of a dependency that the code works with, where that is above what the resolver alone would
# pick, and why.  Checked by installing the lowest allowed versions (uv sync --resolution lowest-direct) and
# running the tests: these are the bounds that failed below.
NEEDED_MINIMUM = {
    "matplotlib": ("3.9", "evaluate.py calls boxplot(tick_labels=...), added in 3.9"),
    "peft": ("0.18", "peft 0.17 imports transformers.HybridCache, which transformers 5 removed"),
    "optuna": ("4.9", "main.py imports optuna.storages.RetryHeartbeatStaleTrialCallback, new in 4.9"),
    "numpy": ("2.0", "pyarrow, which datasets reads through, refuses to import with NumPy 1.x"),
    "scipy": ("1.13", "scipy 1.11 fails to import with NumPy 2 and 1.12 requires NumPy < 1.29"),
    "statsmodels": ("0.14.2", "statsmodels 0.14.0 fails to import with NumPy 2 and 0.14.1 requires NumPy < 2"),
}


def canonical(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503): case and runs of '-', '_', '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> dict[str, set[str]]:
    """{top-level module: {files importing it}} over every module in src/, third-party modules only."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / "src").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("src", "__future__"):
                    found.setdefault(top, set()).add(path.name)
    return found


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()   # reads every installed package's metadata: once


def distributions(module: str) -> set[str]:
    """The canonical names of the distributions that provide a top-level module."""
    installed = installed_modules().get(module, [])
    names = set(installed) | ({IMPORT_TO_DISTRIBUTION[module]} if module in IMPORT_TO_DISTRIBUTION else set())
    return {canonical(n) for n in names}


def declared() -> dict[str, str]:
    """{canonical distribution name: requirement string} of pyproject.toml's [project] dependencies."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return {canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group()): req for req in project["dependencies"]}


def lower_bound(requirement: str) -> tuple[int, ...] | None:
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    return tuple(int(part) for part in match.group(1).split(".") if part) if match else None


def test_every_third_party_import_in_src_is_declared():
    deps = declared()
    missing = {}
    for module, files in imported_modules().items():
        dists = distributions(module)
        if not dists & deps.keys():
            missing[module] = f"{'/'.join(sorted(dists)) or 'unknown distribution'} (imported in {', '.join(sorted(files))})"
    assert not missing, ("imported in src/ but not declared in pyproject.toml [project] dependencies: "
                         + "; ".join(f"{m} -> {d}" for m, d in sorted(missing.items()))
                         + " — add them (then `uv lock`), or map an unknown import in IMPORT_TO_DISTRIBUTION")


def test_every_declared_dependency_is_imported_by_src():
    used = set().union(*(distributions(module) for module in imported_modules()))
    unused = sorted(set(declared()) - used)
    assert not unused, (f"declared in pyproject.toml but imported nowhere in src/: {', '.join(unused)} — remove them "
                        f"(then `uv lock`), or import them where they are used")


def test_every_dependency_has_a_lower_bound_the_code_works_with():
    deps = declared()
    unbounded = sorted(name for name, req in deps.items() if lower_bound(req) is None)
    assert not unbounded, f"dependencies without a '>=' lower bound: {', '.join(unbounded)}"
    for name, (minimum, why) in NEEDED_MINIMUM.items():
        needed = tuple(int(part) for part in minimum.split("."))
        assert lower_bound(deps[canonical(name)]) >= needed, f"{deps[canonical(name)]}: needs >= {minimum} ({why})"


def test_import_names_map_to_their_distributions():
    """The mapping the checks rely on, for the imports whose name differs from their distribution's."""
    assert "pyyaml" in distributions("yaml")
    assert "nvidia-ml-py" in distributions("pynvml")
    assert "hydra-core" in distributions("hydra")
    assert "scikit-learn" in distributions("sklearn")
