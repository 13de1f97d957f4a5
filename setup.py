"""Package layout that pyproject.toml cannot say: config/ ships inside the wheel.

``config/`` stays the one source of the operator files (example and demo settings,
alert rules and their tests, the Grafana dashboard); the wheel carries them as the
data-only package ``proxy.assets``, which ``pinproxy init DIR`` writes out. Everything
else about the project is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["proxy", "proxy.*"]), "proxy.assets"],
    package_dir={"proxy.assets": "config"},
    package_data={"proxy.assets": ["*.toml", "*.yml", "*.json"]},
)
