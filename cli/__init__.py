"""The pack's command-line tools: run by path from the pack's folder (no installation needed)
or as ``python -m ultrares.cli.<tool>`` where the pack is installed."""
