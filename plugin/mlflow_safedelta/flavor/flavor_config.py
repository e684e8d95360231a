"""Keys of the ``safedelta`` flavor configuration (the ``flavors.safedelta`` block of MLmodel).

Read keys with ``conf.get(FlavorKey.X, default)`` so that models saved by older versions of this
plugin keep loading; add new keys here and never rename an old one.
"""

from __future__ import annotations

from mlflow_safedelta.vocab import ROLES, FlavorKey  # noqa: F401  (one place for both)

FLAVOR_VERSION = 1
MODEL_DATA_SUBPATH = "model"
TOKENIZER_SUBPATH = "components/tokenizer"
DELTA_FORMATS = ("full", "lora")
