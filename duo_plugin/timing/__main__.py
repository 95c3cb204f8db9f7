"""``python -m duo_plugin.timing``: where a concept is decided (see ``cli``)."""

from .cli import main


if __name__ == "__main__":
    main()
