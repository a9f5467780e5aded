"""TIME's (τ, w) schedules and what their w means: light (no torch), so registering the plugin stays cheap."""

from __future__ import annotations

from cfx_cli.errors import UsageError


def parse_schedule(text: str) -> list[tuple[int, float]]:
    """``"25:3,30:4"`` → [(25, 3.0), (30, 4.0)]: (τ inversion steps, w guidance) tried in turn."""
    out = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        try:
            tau, w = part.split(":")
            out.append((int(tau), float(w)))
        except ValueError:
            raise UsageError(f"--set schedule={text!r}: expected TAU:W pairs separated by commas, "
                             "e.g. 25:3,30:4") from None
    if not out:
        raise UsageError(f"--set schedule={text!r}: empty schedule")
    return out


#: what a schedule's W means: ``w`` — the guidance scale g itself, as the authors' code (its CLI
#: ``--guidance-scale-*``) and the published schedules use it; ``1+w`` — g = 1 + w, eq. 5.11 read literally
#: ((1+w)·ε(C_i) − w·ε(C_j)), cfx's default before issue 18
GUIDANCE_CONVENTIONS = ("w", "1+w")


def guidance_scale(w: float, convention: str) -> float:
    """The scale g of ε = ε(neg) + g·(ε(pos) − ε(neg)) for a schedule value ``w``."""
    if convention not in GUIDANCE_CONVENTIONS:
        raise UsageError(f"--set guidance={convention!r}: expected one of {', '.join(GUIDANCE_CONVENTIONS)}")
    return float(w) if convention == "w" else 1.0 + float(w)
