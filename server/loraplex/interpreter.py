"""How loraplex starts one of its own modules in a fresh Python interpreter.

Owns: the command line (`python -P -m <module> ...`: nothing in the working directory can shadow
a module) and the environment (this one, with loraplex's own root first on PYTHONPATH, so the
child imports the same loraplex wherever it is installed). The chat-template workers and the
engine process start this way: exec'd, never forked from a process that holds torch's threads.
Must not: start anything itself (callers own their processes and pipes).
"""

import os
import sys
from pathlib import Path

import loraplex


def module_command(module: str, *args: str) -> list[str]:
    """The argv that runs `python -m module args...` with this interpreter."""
    return [sys.executable, "-P", "-m", module, *args]


def module_environment() -> dict[str, str]:
    """This process's environment, with loraplex's package root first on PYTHONPATH."""
    package_root = str(Path(loraplex.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (package_root, os.environ.get("PYTHONPATH"))))}
