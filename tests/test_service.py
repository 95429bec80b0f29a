"""What every service process does at start, run in a process of its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from jobstream.embedded.ports import free_port
from jobstream.embedded.stack import REPO
from jobstream.service import YOUNG_COLLECTION_THRESHOLD


def test_a_service_starts_with_its_imports_frozen_and_its_young_collections_spaced_out() -> None:
    script = textwrap.dedent(
        """
        import gc
        from jobstream.service import run

        async def serve(settings, stop):
            print("frozen", gc.get_freeze_count(), "thresholds", *gc.get_threshold(), flush=True)

        run("probe", serve)
        """
    )
    # No broker on that port: the start-up check of the topics gives up and the service runs.
    env = {**os.environ, "JOBSTREAM_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    frozen, thresholds = int(words[1]), tuple(int(w) for w in words[3:6])
    # The imports alone hold tens of thousands of objects; a handful would mean nothing was frozen.
    assert frozen > 10_000, done.stdout
    # The young generation at YOUNG_COLLECTION_THRESHOLD, the older ones at the interpreter's ratios.
    assert thresholds == (YOUNG_COLLECTION_THRESHOLD, 10, 10), done.stdout
