"""Deprecated: the module's names now live in :mod:`alambic.models.hf` (alambic's layered layout, docs/architecture.md).

Kept so that ``from alambic.hf import ...`` written for alambic 0.1 keeps working; it warns once.
"""

import warnings

from alambic.models.hf import (  # noqa: F401
    build_hf_model,
    choose_layers,
    derive_student,
    derive_to_folder,
    hidden_state_terms,
    layer_pairs,
    load_hf_model,
)

warnings.warn("alambic.hf is deprecated: import from alambic.models.hf", DeprecationWarning, stacklevel=2)
