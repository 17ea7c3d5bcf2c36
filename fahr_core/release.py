"""Which fahr this is: the release number and a fingerprint of the code that is actually installed.

The server and every site must run the same code: a site reviewed and installed one release, and
its DP accounting, outbound allow-list and report depend on that code. A release number alone
cannot show this: an editable install (`make install`) reports the number it was installed with
whatever the checkout later holds, and a patched wheel keeps its number. So the identity the two
ends compare is the release number plus a SHA-256 over the source of fahr's packages as they
sit on disk, e.g. `0.2.0+code.3fa9c1e2b7d0` (a PEP 440 local version). It needs no git and no
build step, so a wheel, a container and a checkout all report it the same way.

The release number is `[project].version` in pyproject.toml, bumped for every release
(docs/coordinator.md, "Upgrading"); the installed distribution's metadata carries it.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path

DISTRIBUTION = "fahr"
# The import packages of the distribution; both ends install all of them, so both hash the same files.
PACKAGES = ("fahr_core", "fahr_ops", "fahr_server", "fahr_client", "fahr_research")


def release() -> str:
    """The release number of the installed fahr distribution (pyproject.toml's [project].version)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"  # running from a bare source tree that was never installed


def package_roots() -> dict[str, Path]:
    """Where each of fahr's packages is installed, found without importing it (fahr_core must not
    import the server's or the client's modules, which need Flower)."""
    roots = {}
    for name in PACKAGES:
        spec = find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = Path(next(iter(spec.submodule_search_locations)))
    return roots


def code_fingerprint(roots: dict[str, Path]) -> str:
    """SHA-256 over every .py file below each root, named by package-relative path, in sorted order.

    Paths are relative so the same code hashes alike wherever it is installed; caches, data and
    compiled files are left out, so running the code never changes it.
    """
    digest = hashlib.sha256()
    for name in sorted(roots):
        root = roots[name]
        for path in sorted(root.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            digest.update(f"{name}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


@cache
def fahr_version() -> str:
    """`<release>+code.<first 12 hex of the code fingerprint>`: what the server and sites compare."""
    return f"{release()}+code.{code_fingerprint(package_roots())[:12]}"
