"""The in-sandbox agent's entry point, PID 1 of the sandbox container: the agent itself is core.py.

The image ships bytecode for the agent's modules, but Python compiles a script run by path from
source on every start (the root is read-only: nothing compiled could be kept anyway). For the
agent's 470 lines that was 3-5 ms of every sandbox's start; this file stays a few lines and the
rest is imported from the image's .pyc files.
"""

import os
import sys

if __name__ == "__main__":  # imported by something else, it starts nothing
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I leaves the script's directory out
    import core

    core.main()
