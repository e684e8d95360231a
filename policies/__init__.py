"""Gate policies shipped with mlflow-safedelta (YAML files in this folder).

Installed as ``mlflow_safedelta.policies``; load one by name with
``mlflow_safedelta.policy.load_policy("default")``.
"""
