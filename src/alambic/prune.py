"""Deprecated: the module's names now live in :mod:`alambic.compress.prune` (alambic's layered layout, docs/architecture.md).

Kept so that ``from alambic.prune import ...`` written for alambic 0.1 keeps working; it warns once.
"""

import warnings

from alambic.compress.prune import (  # noqa: F401
    channel_prune,
    magnitude_prune,
    make_permanent,
    prune_model,
    recover,
    weight_sparsity,
)

warnings.warn(
    "alambic.prune is deprecated: import from alambic.compress.prune", DeprecationWarning, stacklevel=2
)
