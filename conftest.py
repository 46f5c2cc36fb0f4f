"""Modules of an integration whose framework is not installed are not collected (their doctests
import it)."""

import importlib.util

_FRAMEWORKS = {"lightning.py": "lightning", "transformers.py": "transformers", "peft.py": "peft"}

collect_ignore = [
    f"src/clreg/integrations/{module}"
    for module, package in _FRAMEWORKS.items()
    if importlib.util.find_spec(package) is None
]
