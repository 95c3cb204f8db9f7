"""``python -m duo_plugin.pairs``: generate a pair dataset (see ``cli``)."""

from .cli import main


if __name__ == "__main__":
    main()
