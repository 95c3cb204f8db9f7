"""``timing.png``: the curves against t, with the training window and the recommended ``--t_max``."""

from .analysis import FLOW_FAMILIES, window_sigma


def plot(result: dict, settings: dict, path: str, family: str, num_train_timesteps: int, sigma_table=None):
    """Both curves against t, with the training window and the recommended --t_max.

    SD1.x/2.x and SDXL: the window's timesteps are t itself. SD3 and FLUX.1: t = 1000·σ, and the window's σ-table
    indices are drawn at 1000·σ of their table entries (FLUX.1's table is unshifted, so index i sits near
    t = 1000 − i, not at t = i); σ is the top axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flow = family in FLOW_FAMILIES and sigma_table is not None

    def at(index: int) -> float:
        return num_train_timesteps * window_sigma(sigma_table, index) if flow else index

    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    window = settings["window"]
    kind = "σ-table indices" if flow else "timesteps"
    axes.axvspan(
        min(at(window[0]), at(window[1])),
        max(at(window[0]), at(window[1])),
        color="tab:green",
        alpha=0.12,
        label=f"training window: {kind} [{window[0]}, {window[1]})",
    )
    labels = {"empty": 'prompt switch to ""', "safe": "prompt switch to the safe prompt"}
    for curve_kind, curve in result["curves"].items():
        axes.plot(curve["timestep"], curve["still_flagged"], marker="o", markersize=3, label=labels[curve_kind])
    if "renoise" in result:
        renoise = result["renoise"]
        axes.plot(
            renoise["timestep"],
            renoise["still_flagged"],
            marker="s",
            markersize=3,
            linestyle="--",
            label='re-noise to t, denoise with ""',
        )
    axes.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    t_max = result["recommended_t_max"]
    axes.axvline(
        at(t_max),
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"recommended --t_max {t_max}"
        + (f" (σ-table index, σ = {window_sigma(sigma_table, t_max):.3f})" if flow else ""),
    )
    axes.set_xlim(0, num_train_timesteps)
    axes.set_ylim(-0.02, 1.02)
    shift_note = ", σ of the shifted sampling schedule" if family == "flux" else ""
    axes.set_xlabel(
        "t (timestep of the first step without the prompt / noise level)"
        + (f" = 1000·σ{shift_note}" if family in FLOW_FAMILIES else "")
    )
    axes.set_ylabel("share still showing the concept")
    if family in FLOW_FAMILIES:
        secondary = axes.secondary_xaxis(
            "top", functions=(lambda t: t / num_train_timesteps, lambda s: s * num_train_timesteps)
        )
        secondary.set_xlabel("σ")
    axes.set_title(result["verdict"], fontsize=8, wrap=True)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
