"""``python -m duo_plugin.evaluate``: a usage error is one line and exit status 2 (``exit_on_usage_error``)."""

from .cli import main


if __name__ == "__main__":
    main()
