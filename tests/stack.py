"""The stack the end-to-end tests run against: jobstream.embedded.stack, under the name tests use."""

from jobstream.embedded.stack import REPO
from jobstream.embedded.stack import LocalStack as Stack

__all__ = ["REPO", "Stack"]
