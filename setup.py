"""Package discovery for fahr's import packages, whose folders are not named like the packages.

pyproject.toml holds everything else. setuptools' own `packages.find` cannot map the folders
`ops`, `server`, `client` and `research` to the import names `fahr_ops`, `fahr_server`,
`fahr_client` and `fahr_research`, and a hand-written list silently dropped new subpackages (a
wheel once shipped without fahr_core.age); here every folder below each root is a package.
Folders without an __init__.py count too (namespace discovery): the data folders
fahr_core/demo_data and its images/ are importable to Python, and setuptools warns of an
ambiguous configuration when package data lies in a folder it was not told is a package.
"""

from setuptools import find_namespace_packages, setup

PACKAGE_DIRS = {
    "fahr_core": "fahr_core",
    "fahr_ops": "ops",
    "fahr_server": "server",
    "fahr_client": "client",
    "fahr_research": "research",
}

setup(
    package_dir=PACKAGE_DIRS,
    packages=[
        f"{name}{suffix}"
        for name, folder in PACKAGE_DIRS.items()
        for suffix in ["", *(f".{sub}" for sub in find_namespace_packages(folder, exclude=["*__pycache__*"]))]
    ],
)
