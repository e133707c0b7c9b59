"""The operator CLI (``certautopilot``): command groups, output rendering and probes.

Nothing imports this package; it is the top of the layer stack.
"""

from worker.cli.main import main

__all__ = ["main"]
