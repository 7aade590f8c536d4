"""Stand-ins fitted without training (`gateskip fit-fill`): ridge regression of what each branch
adds on its input, over the tokens that skip first. Kept apart from `fill.py` (the stand-in
modules), because fitting runs the gated model (calibration sequences, the walk) while the walk
itself only needs the modules."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gateskip_core.branches import BRANCHES
from gateskip_core.errors import GateSkipError
from gateskip_core.forward.execution import Capture
from gateskip_core.gating.fill import FillSpec, SkipFill
from gateskip_core.skipping.calibration import calibration_sequences


def ridge_fill(x: torch.Tensor, y: torch.Tensor, spec: FillSpec, ridge: float = 1e-2) -> dict[str, torch.Tensor]:
    """Parameters of one stand-in fitted to targets y [N, d] from inputs x [N, d].

    `mean`: the mean of y. `lowrank:R`: ridge regression y ~ x W + c, reduced to rank R
    along the top principal directions of its fitted values (reduced-rank regression).
    """
    x, y = x.double(), y.double()
    y_mean = y.mean(0)
    if spec.kind == "mean":
        return {"bias": y_mean.float()}
    x_mean = x.mean(0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    scale = gram.diagonal().mean().clamp(min=1e-12)
    w = torch.linalg.solve(gram + ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)  # [d, d]
    _, _, vh = torch.linalg.svd(xc @ w, full_matrices=False)
    v = vh[: spec.rank].T  # [d, R]
    down = (w @ v).T  # [R, d]
    return {"bias": (y_mean - x_mean @ w @ v @ v.T).float(), "down": down.float(), "up": v.float()}


def fit_fill(
    model,
    spec: FillSpec,
    texts: Sequence[str],
    lowest: float = 0.3,
    n_sequences: int = 64,
    max_tokens: int = 128,
    progress: Callable[[str], None] = lambda msg: None,
) -> SkipFill:
    """A stand-in per (layer, branch) fitted without training on `model`'s gated walk at budget 0:
    targets are what each branch adds, over the `lowest` fraction of tokens by gate value (the
    tokens that skip first). Uses the model's adapter scope, so targets are what those tokens add."""
    if model.gates is None:
        raise GateSkipError("fitting a skip fill needs gates (they choose the tokens it stands in for)")
    if not 0 < lowest <= 1:
        raise GateSkipError(f"the fraction of lowest-gate tokens must lie in (0, 1], got {lowest}")
    input_ids, mask = calibration_sequences(model, list(texts), n_sequences, max_tokens)
    progress(f"fitting {spec.label} stand-ins on {int(mask.sum())} tokens")
    out = model.forward(input_ids, mask, model.make_plan(0.0), capture=Capture(branch_io=True))
    eligible = out.eligible.cpu()
    fill = SkipFill(model.spec.n_layers, model.spec.d_model, spec)
    for i, (x, delta) in enumerate(out.branch_io):
        layer, b = divmod(i, 2)
        gate = out.gate[:, :, layer, b].cpu()[eligible]
        chosen = gate <= torch.quantile(gate, lowest)
        params = ridge_fill(x.cpu()[eligible][chosen], delta.cpu()[eligible][chosen], spec)
        target = fill.fill(layer, BRANCHES[b])
        with torch.no_grad():
            for name, value in params.items():
                getattr(target, name).copy_(value)
    for p in fill.parameters():
        p.requires_grad_(False)
    return fill.eval()
