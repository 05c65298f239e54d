"""
pip install . puts salt-release where Salt's loader finds it without a sync:
the ``salt.loader`` entry point names the ``salt_release`` package, whose
``modules``, ``states``, ``runners`` and ``pillar`` are the repository's
``_modules``, ``_states``, ``_runners`` and ``_pillar`` folders.

The shared helpers in ``_utils`` are installed as top-level modules
(``release_contract``, ...), the names every loader module imports them by:
a synced install finds the same names in ``extmods/utils``, which Salt puts
on ``sys.path`` while it loads a module. One import style, both modes.
"""

import glob
import os

from setuptools import setup

UTILS = sorted(os.path.splitext(os.path.basename(path))[0] for path in glob.glob("_utils/release*.py"))

setup(
    name="salt-release",
    version="0.1.0",
    description="Salt-native release system for multi-node web clusters",
    packages=[
        "salt_release",
        "salt_release.modules",
        "salt_release.states",
        "salt_release.runners",
        "salt_release.utils",
        "salt_release.pillar",
    ],
    package_dir={
        "": "_utils",
        "salt_release": "salt_release",
        "salt_release.modules": "_modules",
        "salt_release.states": "_states",
        "salt_release.runners": "_runners",
        "salt_release.utils": "_utils",
        "salt_release.pillar": "_pillar",
    },
    py_modules=UTILS,
    python_requires=">=3.9",
    install_requires=["salt>=3006", "GitPython>=3.1"],
    entry_points={"salt.loader": ["salt_release = salt_release"]},
)
