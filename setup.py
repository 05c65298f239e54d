"""
pip install . puts salt-release where Salt's loader finds it without a sync:
the ``salt.loader`` entry point names the ``salt_release`` package, whose
``modules``, ``states``, ``runners`` and ``utils`` are the repository's
``_modules``, ``_states``, ``_runners`` and ``_utils`` folders.
"""

from setuptools import setup

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
        "salt_release": "salt_release",
        "salt_release.modules": "_modules",
        "salt_release.states": "_states",
        "salt_release.runners": "_runners",
        "salt_release.utils": "_utils",
        "salt_release.pillar": "_pillar",
    },
    python_requires=">=3.9",
    install_requires=["salt>=3006", "GitPython>=3.1"],
    entry_points={"salt.loader": ["salt_release = salt_release"]},
)
