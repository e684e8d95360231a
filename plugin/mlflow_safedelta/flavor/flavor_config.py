"""Keys of the ``safedelta`` flavor configuration (the ``flavors.safedelta`` block of MLmodel).

Read keys with ``conf.get(FlavorKey.X, default)`` so that models saved by older versions of this
plugin keep loading; add new keys here and never rename an old one.
"""

from __future__ import annotations


class FlavorKey:
    #: schema version of this flavor block (int)
    FLAVOR_VERSION = "flavor_version"
    #: subdirectory holding the weights (full checkpoint or PEFT adapter)
    MODEL_DATA = "model_data"
    #: subdirectory holding the tokenizer files
    TOKENIZER = "tokenizer"
    #: ``full`` (a complete checkpoint) or ``lora`` (a PEFT adapter applied onto the parent)
    DELTA_FORMAT = "delta_format"
    #: the aligned parent: ``models:/name/version`` or ``models:/name@alias`` (or a local path)
    PARENT_URI = "parent_uri"
    #: content fingerprint of the parent's weights (``safedelta.fingerprint``), when known
    PARENT_FINGERPRINT = "parent_fingerprint"
    #: content fingerprint of this model's weights
    FINGERPRINT = "fingerprint"
    #: ``aligned``, ``finetuned`` or ``protected``
    ROLE = "role"
    #: the ``SafeDeltaConfig`` a protected model was produced with (plain dict)
    SAFEDELTA_CONFIG = "safedelta_config"
    #: library versions at save time
    TRANSFORMERS_VERSION = "transformers_version"
    TORCH_VERSION = "torch_version"
    SAFEDELTA_VERSION = "safedelta_version"
    #: code paths copied next to the model (MLflow convention)
    CODE = "code"


FLAVOR_VERSION = 1
MODEL_DATA_SUBPATH = "model"
TOKENIZER_SUBPATH = "components/tokenizer"
DELTA_FORMATS = ("full", "lora")
ROLES = ("aligned", "finetuned", "protected")
