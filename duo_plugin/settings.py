"""A run's settings once resolved: read-only, passed by value.

The training scripts parse their flags into an ``argparse.Namespace``; ``arguments.resolve_training_args`` fills what
the user left unset (the concept's preset, the family's recipe, the named objective) into a ``Settings``. Nothing
assigns to it afterwards: the values a run learns later (the flow-matching λ from the scheduler's table, the t_max
the timing diagnostic measures, the pair folder generated, the retain set's record) make a new object with
``replace``, so any function given settings sees one consistent run and cannot change what its caller holds.
"""

import argparse


class FrozenSettingsError(AttributeError):
    pass


class Settings(argparse.Namespace):
    """An ``argparse.Namespace`` that refuses assignment; read it as ``settings.learning_rate``."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __setattr__(self, name, value):
        raise FrozenSettingsError(f"settings are read-only: make a new object with settings.replace({name}=...)")

    def __delattr__(self, name):
        raise FrozenSettingsError(f"settings are read-only: {name} cannot be removed")

    def replace(self, **changes) -> "Settings":
        """A copy with ``changes`` applied."""
        return with_values(self, **changes)


def with_values(namespace: argparse.Namespace, **changes) -> Settings:
    """``namespace``'s values (a ``Settings`` or a plain ``argparse.Namespace``) with ``changes``, as a new
    ``Settings``; ``namespace`` itself is left as it was."""
    return Settings(**{**vars(namespace), **changes})
