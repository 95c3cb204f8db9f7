"""``--help`` that states every default worth stating, for every command's parser."""

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
