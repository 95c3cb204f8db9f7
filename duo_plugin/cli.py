"""The console entry points.

The entry points (``duo-pairs``, ``duo-evaluate``, ``duo-quickstart``, declared in pyproject.toml) run
the same ``main`` as ``python -m duo_plugin.<module>``. The training scripts stay scripts
(``train_duo.py``, ``train_duo_sd3.py``), as diffusers' training examples are.
"""


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
