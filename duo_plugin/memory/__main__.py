"""``python -m duo_plugin.memory``: the table of a command line's estimates (see ``cli``)."""

from .cli import main


if __name__ == "__main__":
    main()
