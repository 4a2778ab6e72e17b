"""Command-line tools: the pack's long jobs outside the ComfyUI frontend, one module per tool,
named ``<method>_<job>.py`` (``clear_distill``, ``gspn_distill``, ``infdit_convert``,
``infdit_upscale``).

Each tool runs two ways: by path from a ComfyUI install, with ComfyUI's Python
(``python custom_nodes/ComfyUI-UltraRes/cli/<tool>.py ...``), and as ``python -m
ultrares.cli.<tool> ...`` where the pack is installed. A tool follows one pattern:

- its first lines are ``if __name__ == "__main__" and not __package__: import _pack;
  _pack.run(__file__)``: run by path, ``cli/`` is the first folder on ``sys.path``, and
  :mod:`._pack` loads this checkout as ``ultrares`` and runs the tool as ``ultrares.cli.<tool>``;
  after them it imports the pack relatively, from the packages' public APIs
  (``from ..models.gspn import ...``);
- ``main(argv: list[str] | None = None) -> int`` parses the arguments, does the job and returns
  the exit status (the tests call it); ``if __name__ == "__main__": sys.exit(main())``;
- a tool that needs ComfyUI boots it from ``--comfyui`` / ``COMFYUI_PATH`` before importing
  ``ultrares.nodes`` (which imports ComfyUI) and reuses the nodes' code from there; the
  distillation tools share that boot and their Ctrl-C ending (:mod:`._distill_tool`).
"""
