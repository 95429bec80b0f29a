"""Registers the kinds that ship with jobstream; loaded through the ``jobstream.kinds`` entry point.

The kind modules themselves register nothing, so importing one (in a test, say) has no side effect
on the registry.
"""

from __future__ import annotations

from jobstream.kinds.demo_sleep import DemoSleep
from jobstream.kinds.registry import register
from jobstream.kinds.wordcount import WordCount

register(DemoSleep)
register(WordCount)
