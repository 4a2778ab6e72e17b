"""How a tool run by path (``python custom_nodes/ComfyUI-UltraRes/cli/<tool>.py``) runs: this
checkout is loaded under the name the pack is installed as, ``ultrares``, and the tool runs as
``ultrares.cli.<tool>``, so its relative imports of the pack resolve."""

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import NoReturn


def run(tool_file: str) -> NoReturn:
    """Run the tool ``tool_file`` (its ``__file__``) as ``ultrares.cli.<tool>`` and exit with its status."""
    root = Path(__file__).resolve().parents[1]
    if "ultrares" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ultrares", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        sys.modules["ultrares"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["ultrares"])
    sys.exit(importlib.import_module(f"ultrares.cli.{Path(tool_file).stem}").main())
