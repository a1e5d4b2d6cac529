"""Launcher of the standalone build (packaging/dicomfuse.spec): the ``dicomfuse`` console script's entry point."""

from dicomfuse.cli.main import entry

if __name__ == "__main__":
    entry()
