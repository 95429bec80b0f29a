"""jobstream's benchmark suite: `python -m bench` (or `make bench`) starts the embedded stack, runs
each scenario and writes its results as JSON and a Markdown table."""
