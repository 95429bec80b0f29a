"""The job-kind plugin API: what a kind implements and how it is found by name.

See :mod:`jobstream.kinds.api` for the contract and :mod:`jobstream.kinds.registry` for how a user
package adds its own kinds.
"""

from jobstream.kinds.api import JSON, ChunkContext, JobKind, RetryPolicy
from jobstream.kinds.params import Param, ParamSpec
from jobstream.kinds.registry import get_kind, kind_names, load_kinds, register

__all__ = [
    "JSON",
    "ChunkContext",
    "JobKind",
    "Param",
    "ParamSpec",
    "RetryPolicy",
    "get_kind",
    "kind_names",
    "load_kinds",
    "register",
]
