"""``python -m sandbox``: the same command line as the ``sandbox`` console script."""

from sandbox.execcmd import main  # a plain `sandbox exec` without click; everything else: sandbox.cli:main

if __name__ == "__main__":
    main()
