"""Mapping declarations, loading, validation and compiled transforms."""

from sa_dualwrite.mapping._compile import CompiledMapping, compile_all
from sa_dualwrite.mapping._load import (
    declared_mappings,
    load_mappings,
    normalize,
)
from sa_dualwrite.mapping._spec import (
    Compute,
    Const,
    Copy,
    FieldSpec,
    Mapping,
    Ref,
    Values,
    compute,
    const,
    copy,
    ref,
    values,
)

__all__ = [
    "CompiledMapping",
    "Compute",
    "Const",
    "Copy",
    "FieldSpec",
    "Mapping",
    "Ref",
    "Values",
    "compile_all",
    "compute",
    "const",
    "copy",
    "declared_mappings",
    "load_mappings",
    "normalize",
    "ref",
    "values",
]
