"""Deprecated: the module's names now live in :mod:`alambic.compress.head_pruning` (alambic's layered layout, docs/architecture.md).

Kept so that ``from alambic.heads import ...`` written for alambic 0.1 keeps working; it warns once.
"""

import warnings

from alambic.compress.head_pruning import head_importance, prune_heads_by_importance, select_heads  # noqa: F401

warnings.warn(
    "alambic.heads is deprecated: import from alambic.compress.head_pruning", DeprecationWarning, stacklevel=2
)
