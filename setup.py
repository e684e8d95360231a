"""Package discovery that pyproject.toml cannot express: ``policies/`` (top level, so a newcomer
finds the gate rules without digging) is installed as ``mlflow_safedelta.policies``."""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=[
        *find_namespace_packages(".", include=["safedelta", "safedelta.*"]),  # data folders too
        *find_packages("plugin", include=["mlflow_safedelta", "mlflow_safedelta.*"]),
        "mlflow_safedelta.policies",
    ],
)
