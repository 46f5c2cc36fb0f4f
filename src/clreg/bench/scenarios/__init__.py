"""The built-in scenarios (listed in :data:`clreg.bench.registry.SCENARIOS`, imported on first use): ``digits`` (Split Digits) and ``onehead`` (the one-head benchmark's tasks)."""
