"""Imported first by a tool run by path (``python custom_nodes/ComfyUI-UltraRes/cli/<tool>.py``):
it loads this checkout under the name the tools import it by, ``ultrares``."""

import importlib.util
import sys
from pathlib import Path

if "ultrares" not in sys.modules:
    _ROOT = Path(__file__).resolve().parents[1]
    _spec = importlib.util.spec_from_file_location("ultrares", _ROOT / "__init__.py",
                                                   submodule_search_locations=[str(_ROOT)])
    sys.modules["ultrares"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["ultrares"])
