"""sa_dualwrite: replicate SQLAlchemy ORM writes from a V1 model to a V2 model.

Install it on the V1 engine with :func:`install_dual_write`; describe each
V1 class and its V2 counterpart with a :class:`Mapping`. Every insert,
update and delete that an ORM session flushes and commits on V1 is then
written to V2, audited, cross-referenced and revertible.
"""

from sa_dualwrite import signals
from sa_dualwrite._context import acting_as, session_key
from sa_dualwrite._errors import (
    DualWriteError,
    MappingError,
    RevertConflict,
    SyncError,
    UnsyncedWriteError,
)
from sa_dualwrite._install import DualWrite, install_dual_write
from sa_dualwrite._store import metadata, outbox_metadata
from sa_dualwrite._verify import MappingReport, Mismatch, VerifyReport
from sa_dualwrite.mapping import (
    Mapping,
    compute,
    const,
    copy,
    load_mappings,
    ref,
    values,
)

__version__ = "0.1.0"

__all__ = [
    "DualWrite",
    "DualWriteError",
    "Mapping",
    "MappingError",
    "MappingReport",
    "Mismatch",
    "RevertConflict",
    "SyncError",
    "UnsyncedWriteError",
    "VerifyReport",
    "__version__",
    "acting_as",
    "compute",
    "const",
    "copy",
    "install_dual_write",
    "load_mappings",
    "metadata",
    "outbox_metadata",
    "ref",
    "session_key",
    "signals",
    "values",
]
