"""Command-line plumbing shared by the commands: defaults in ``--help``, and the console entry points.

The entry points (``duo-pairs``, ``duo-evaluate``, ``duo-quickstart``, declared in pyproject.toml) run
the same ``main`` as ``python -m duo_plugin.<module>``. The training scripts stay scripts
(``train_duo.py``, ``train_duo_sd3.py``), as diffusers' training examples are.
"""

import argparse


HIDDEN_DEFAULTS = (None, False, argparse.SUPPRESS)


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add "(default: ...)" to the help of every option that has a default worth stating.

    Unlike ``ArgumentDefaultsHelpFormatter`` this also covers options without a help text, and it skips
    ``None`` and ``False`` (an unset value or a switch that is off), whose help says what happens instead.
    """
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        default = action.default
        if any(default is hidden for hidden in HIDDEN_DEFAULTS) or (
            isinstance(default, (list, tuple)) and not default
        ):
            continue
        if action.help is None:
            action.help = "default: %(default)s"
        elif (
            action.help is not argparse.SUPPRESS
            and "%(default)" not in action.help
            and "default" not in action.help.lower()
        ):
            action.help += " (default: %(default)s)"
    return parser


def _run(main) -> int:
    main()
    return 0


def pairs_command() -> int:
    from .pairs import main

    return _run(main)


def evaluate_command() -> int:
    from .evaluate import main

    return _run(main)


def quickstart_command() -> int:
    from .quickstart import main

    return _run(main)
