"""Draw the margin losses against the margin and the regression losses against the residual.

Usage: ``python scripts/plot_losses.py [--out docs/losses.png]``. Every curve is computed by the
library's own loss modules (``reduction='none'``), so the figure shows what the code does.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import losses  # noqa: E402

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "losses.png"
MARGIN_RANGE = (-2.5, 2.5)  # margin z = y * score, or E(Ybar) - E(Y) for energy losses
RESIDUAL_RANGE = (-3.0, 3.0)  # residual r = prediction - target
POINTS = 501


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG file to write")
    return parser


def margin_curves(z: torch.Tensor) -> dict[str, torch.Tensor]:
    """Margin losses as functions of the margin z (positive: correct side)."""
    ones = torch.ones_like(z)
    # energies of (correct answer, most offending wrong answer) with a gap of z
    energies = torch.stack([torch.zeros_like(z), z], dim=1)
    target = torch.zeros(len(z), dtype=torch.long)
    energy = {name: losses.build_loss(name, reduction="none") for name in ("perceptron", "mce")}
    return {
        "zero-one": (z <= 0).to(z.dtype),
        "hinge": losses.build_loss("hinge", reduction="none")(z, ones),
        "squared-hinge": losses.build_loss("squared-hinge", reduction="none")(z, ones),
        "soft-margin (logistic)": losses.build_loss("soft-margin", reduction="none")(z, ones),
        "binary-focal (gamma=2)": losses.build_loss(
            "binary-focal", alpha=-1.0, gamma=2.0, reduction="none"
        )(z, ones),
        "perceptron": energy["perceptron"](energies, target),
        "mce (sigmoid)": energy["mce"](energies, target),
    }


def regression_curves(r: torch.Tensor) -> dict[str, torch.Tensor]:
    """Regression losses as functions of the residual r."""
    zero = torch.zeros_like(r)
    return {
        "l1": losses.build_loss("l1", reduction="none")(r, zero),
        "mse": losses.build_loss("mse", reduction="none")(r, zero),
        "huber (delta=1)": losses.build_loss("huber", delta=1.0, reduction="none")(r, zero),
        "smooth-l1 (beta=0.5)": losses.build_loss("smooth-l1", beta=0.5, reduction="none")(r, zero),
        "log-cosh": losses.build_loss("log-cosh", reduction="none")(r, zero),
    }


def main(args: argparse.Namespace) -> Path:
    z = torch.linspace(*MARGIN_RANGE, POINTS, dtype=torch.float64)
    r = torch.linspace(*RESIDUAL_RANGE, POINTS, dtype=torch.float64)
    fig, (ax_m, ax_r) = plt.subplots(1, 2, figsize=(12, 4.8))
    with torch.no_grad():
        for label, curve in margin_curves(z).items():
            ax_m.plot(z, curve, label=label)
        for label, curve in regression_curves(r).items():
            ax_r.plot(r, curve, label=label)
    ax_m.set(
        title="Margin losses",
        xlabel="margin  z = y f(x)  (or E(Ybar) - E(Y))",
        ylabel="loss",
        ylim=(-0.1, 4.0),
    )
    ax_r.set(
        title="Regression losses",
        xlabel="residual  r = prediction - target",
        ylabel="loss",
        ylim=(-0.1, 4.0),
    )
    for ax in (ax_m, ax_r):
        ax.axvline(0.0, color="0.8", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(args.out)  # atomic: never leave a half-written figure
    logger.info("wrote %s", args.out)
    return args.out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
