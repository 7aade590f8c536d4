"""Plotly figure builders shared by the dashboard and the notebooks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from gateskip_core import BRANCHES, Trace
from gateskip_core.branches import branches_per_token

METHOD_COLOURS = {
    "gateskip": "#d62728",
    "random": "#7f7f7f",
    "shortgpt": "#1f77b4",
    "shortgpt-calibration": "#17becf",
    "attn-only": "#2ca02c",
    "mlp-only": "#9467bd",
}


def _label(tok: str) -> str:
    return tok.replace("\n", "\\n").replace(" ", "·") or "∅"


CELL_FIELDS = ("token", "position", "layer", "threshold", "status", "branch", "gate")

# What one cell's gate did, in the words of every display (hover text, legends). In adapter scope
# 'skipped' a token runs the original model until its first skip: its gates there rank it and scale
# nothing, so a dark cell need not mean a weak branch (`Trace.gate_role`, `SequenceTrace.gate_applied`).
CELL_ROLES = {
    "skipped": "skipped",
    "applied": "applied: scaled the branch output",
    "ranked": "ranked only, not applied (token still on the original model)",
    "ungated": "not applied: no gates, the branch ran unscaled",
}
NOT_APPLIED_LEGEND = "grey: gate not applied (ranked only)"


def not_applied_cells(trace: Trace, sequence: int = 0) -> np.ndarray:
    """[T, L, 2] bool: cells the token ran whose gate scaled nothing (`gate_applied` 0, not skipped)."""
    seq = trace.sequences[sequence]
    return ~seq.gate_applied & ~seq.skipped


def cell_roles(trace: Trace, sequence: int = 0) -> np.ndarray:
    """[T, L, 2] the `CELL_ROLES` text of every cell: skipped, applied, or ran with its gate not applied."""
    seq = trace.sequences[sequence]
    idle = CELL_ROLES["ranked"] if trace.has_gates else CELL_ROLES["ungated"]
    roles = np.where(seq.gate_applied, CELL_ROLES["applied"], idle).astype(object)
    roles[seq.skipped] = CELL_ROLES["skipped"]
    return roles


def gate_legend(trace: Trace, sequence: int | None = None, branches: tuple[str, ...] = BRANCHES) -> str:
    """What a gate is in the trace's scope and how many of the shown gates acted: of the cells that
    ran (one sequence, or all with `sequence=None`; the given branches), the share the gate scaled."""
    seqs = trace.sequences if sequence is None else [trace.sequences[sequence]]
    cols = [BRANCHES.index(b) for b in branches]
    ran = sum(int((~s.skipped[:, :, cols]).sum()) for s in seqs)
    applied = sum(int(s.gate_applied[:, :, cols].sum()) for s in seqs)
    if not trace.has_gates:
        return trace.gate_role()
    share = f"{applied / ran:.0%} of the shown gates acted ({applied} of the {ran} cells that ran)" if ran else ""
    if trace.adapter_scope == "skipped":
        return f"gate = ranking score for every token, a scale only from the token's first skip on; {share}"
    return f"gate = ranking score and scale; {share}"


def clicked_cell(selection: dict | None) -> tuple[int, int, str] | None:
    """(position, layer, branch) of the first heatmap cell in a Plotly selection event (Streamlit's
    `st.plotly_chart(..., on_select="rerun")` result), or None when no cell is selected."""
    points = ((selection or {}).get("selection") or {}).get("points") or []
    for point in points:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)) and len(data) == len(CELL_FIELDS):
            return int(data[1]), int(data[2]), str(data[5])
    return None


def gate_heatmap(trace: Trace, sequence: int = 0, branches: tuple[str, ...] = BRANCHES) -> go.Figure:
    """Layers x tokens heatmap of gate values per branch: skipped cells marked with x, cells whose gate
    did not act (ran unscaled: `not_applied_cells`) greyed out, the legend saying which; every cell
    clickable (an invisible marker with the cell's `CELL_FIELDS` as customdata, see `clicked_cell`)."""
    seq = trace.sequences[sequence]
    fig = make_subplots(
        rows=len(branches),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=[f"{m} gates" for m in branches],
    )
    x = [f"{i}:{_label(t)}" for i, t in enumerate(seq.tokens)]
    idle, roles = not_applied_cells(trace, sequence), cell_roles(trace, sequence)
    for row, branch in enumerate(branches, start=1):
        b = BRANCHES.index(branch)
        z = seq.gate[:, :, b].T  # [L, T]
        fig.add_trace(
            go.Heatmap(z=z, x=x, y=list(range(seq.gate.shape[1])), coloraxis="coloraxis", hoverinfo="skip"),
            row=row,
            col=1,
        )
        fig.add_trace(_not_applied_overlay(idle[:, :, b].T, x), row=row, col=1)
        fig.add_trace(_cell_markers(seq, b, roles[:, :, b].T, x), row=row, col=1)
        fig.add_trace(_marks(seq.skipped[:, :, b].T, x, "skipped", row == 1), row=row, col=1)
        fig.update_yaxes(title_text="layer", row=row, col=1)
    shown = [BRANCHES.index(m) for m in branches]
    if idle[:, :, shown].any():  # a legend entry for the grey cells (the overlay heatmap has none of its own)
        fig.add_trace(_legend_swatch(NOT_APPLIED_LEGEND if trace.has_gates else "grey: no gate, ran unscaled"))
    # Gates are narrow within a model (often 0.9-1.0): scale colours to the values shown.
    values = seq.gate[:, :, shown]
    fig.update_layout(
        title=dict(text=_wrapped(gate_legend(trace, sequence, branches)), font=dict(size=13)),
        coloraxis=dict(
            colorscale="Viridis", cmin=float(values.min()), cmax=float(values.max()), colorbar=dict(title="gate")
        ),
        legend=dict(orientation="h", x=1.0, xanchor="right", y=1.0, yanchor="bottom"),
        height=260 * len(branches) + 120,
        margin=dict(l=50, r=20, t=100, b=40),
    )
    return fig


def _wrapped(text: str, width: int = 95) -> str:
    """Plotly does not wrap titles: break long ones into lines."""
    import textwrap

    return "<br>".join(textwrap.wrap(text, width))


def _not_applied_overlay(idle: np.ndarray, x: list[str]) -> go.Heatmap:
    """A grey veil over the [L, T] cells whose gate did not act ("greyed out"): their colour stays faintly
    readable, and no gate colour of the scale looks like it."""
    return go.Heatmap(
        z=np.where(idle, 1.0, np.nan),
        x=x,
        y=list(range(idle.shape[0])),
        colorscale=[[0, "#d0d0d0"], [1, "#d0d0d0"]],
        zmin=0,
        zmax=1,
        opacity=0.78,
        showscale=False,
        hoverinfo="skip",
        name="gate not applied",
    )


def _cell_markers(seq, b: int, roles: np.ndarray, x: list[str]) -> go.Scatter:
    """One invisible marker per cell carries the hover text and makes cells clickable: Plotly does not
    report clicks on heatmap cells as selections, but it does on markers (customdata: CELL_FIELDS)."""
    L, T = roles.shape
    branch = BRANCHES[b]
    cells = np.stack(
        [
            np.broadcast_to(np.array(seq.tokens, dtype=object), (L, T)),
            np.broadcast_to(np.arange(T), (L, T)),
            np.broadcast_to(np.arange(L)[:, None], (L, T)),
            seq.threshold[:, :, b].T,
            roles,
            np.full((L, T), branch, dtype=object),
            seq.gate[:, :, b].T,
        ],
        axis=-1,
    ).reshape(L * T, -1)
    return go.Scatter(
        x=x * L,
        y=np.repeat(np.arange(L), T),
        mode="markers",
        marker=dict(size=10, opacity=0),
        customdata=cells,
        showlegend=False,
        name=f"{branch} cells",
        hovertemplate=(
            "token %{customdata[0]|s}<br>position %{customdata[1]}<br>layer %{customdata[2]}"
            "<br>branch %{customdata[5]}<br>gate %{customdata[6]:.4f} — %{customdata[4]}"
            "<br>threshold %{customdata[3]:.4f}<extra></extra>"
        ),
    )


def _marks(cells: np.ndarray, x: list[str], name: str, legend: bool) -> go.Scatter:
    """An x on each marked [L, T] cell (the skipped ones), with one legend entry."""
    ly, tx = np.nonzero(cells)
    return go.Scatter(
        x=[x[t] for t in tx],
        y=ly,
        mode="markers",
        hoverinfo="skip",
        name=f"x: {name}",
        showlegend=legend and bool(len(ly)),
        legendgroup=name,
        marker=dict(symbol="x-thin", size=7, line=dict(width=1.5, color="#d62728")),
    )


def _legend_swatch(name: str) -> go.Scatter:
    """A legend entry only (no point drawn): a grey square for the cells whose gate did not act."""
    return go.Scatter(
        x=[None],
        y=[None],
        mode="markers",
        name=name,
        marker=dict(symbol="square", size=12, color="#d0d0d0", line=dict(width=1, color="#999")),
    )


TOKEN_CSS = (
    "<style>.gs-tokens{font-size:1rem;line-height:2.1;white-space:pre-wrap;word-break:break-word}"
    ".gs-tok{padding:0.15em 0.05em;border-radius:3px;color:#111}"
    ".gs-tok.gs-skip{text-decoration:underline dashed #b00000}"
    ".gs-tok.gs-mark{outline:2px solid #111;font-weight:600}"
    ".gs-tok.gs-idle{border-bottom:2px dotted #777}"
    ".gs-row{margin:0.2em 0}.gs-legend{font-size:0.8rem;color:#555}</style>"
)


def _red(level: float) -> str:
    """A background from white (0) to red (1), light enough that dark text stays readable."""
    level = min(1.0, max(0.0, float(level)))
    return f"rgba(220, 40, 30, {0.08 + 0.62 * level:.3f})"


def _token_span(
    token: str, level: float, title: str, skipped: bool = False, marked: bool = False, idle: bool = False
) -> str:
    """One token as inline text: its own characters (a newline shown as ↵ and kept), coloured;
    `idle`: dotted grey underline, its gate(s) did not act (ranked only)."""
    import html

    text = html.escape(token.replace("\n", "↵\n")) if token else "∅"
    classes = "gs-tok" + (" gs-skip" if skipped else "") + (" gs-mark" if marked else "") + (" gs-idle" if idle else "")
    return f'<span class="{classes}" style="background:{_red(level)}" title="{html.escape(title)}">{text}</span>'


def token_strip_html(trace: Trace, sequence: int = 0) -> str:
    """The prompt as readable inline text: each token's background is the share of its branches it
    skipped (white: none, red: all); a dotted grey underline marks a token none of whose gates acted
    (in adapter scope 'skipped', one that never skipped: it ran the original model); hover shows
    position, skipped count, how many of the branches it ran its gate scaled, and mean gate."""
    seq = trace.sequences[sequence]
    counts = seq.skipped.sum(axis=(1, 2))
    ran = (~seq.skipped).sum(axis=(1, 2))
    applied = seq.gate_applied.sum(axis=(1, 2))
    total = branches_per_token(trace.n_layers)
    spans = [
        _token_span(
            token,
            counts[i] / total,
            f"position {i} · skipped {int(counts[i])} of {total} branches · gate applied at {int(applied[i])} of "
            f"the {int(ran[i])} it ran (the rest ranked only) · mean gate {float(seq.gate[i].mean()):.3f}",
            idle=bool(ran[i]) and not applied[i],
        )
        for i, token in enumerate(seq.tokens)
    ]
    legend = f"background: share of the {total} branches the token skipped (white none, red all)"
    if ((ran > 0) & (applied == 0)).any():
        legend += "; dotted underline: none of the token's gates acted (every branch it ran, ran unscaled)"
    legend += f". {gate_legend(trace, sequence)}"
    return TOKEN_CSS + f'<div class="gs-tokens">{"".join(spans)}</div><div class="gs-legend">{legend}</div>'


def context_html(contexts: pd.DataFrame, value: str = "gate") -> str:
    """Example contexts (`TraceDB.example_contexts`) as lines of readable text: the example token
    outlined, every token coloured by its gate at the chosen (layer, branch) (red: low gate) or,
    with `value='skipped'`, by the decision; skipped tokens underlined; with a `gate_applied` column,
    tokens that ran the branch unscaled (gate not applied: ranked only) dotted; values on hover."""
    has_applied = "gate_applied" in contexts.columns
    rows = []
    for example, part in contexts.sort_values(["example", "offset"]).groupby("example", sort=True):
        spans = []
        for r in part.itertuples():
            level = 1.0 - float(r.gate) if value == "gate" else float(r.skipped)
            idle = has_applied and not r.skipped and not r.gate_applied
            state = "skipped" if r.skipped else ("ran, gate not applied (ranked only)" if idle else "kept")
            title = f"offset {r.offset} · gate {float(r.gate):.3f} · {state}"
            spans.append(_token_span(r.token, level, title, bool(r.skipped), r.offset == 0, idle))
        rows.append(f'<div class="gs-row gs-tokens"><b>#{example}</b> {"".join(spans)}</div>')
    legend = "outlined: the example token; background: its gate here (red: low); dashed underline: skipped"
    if has_applied:
        legend += "; dotted underline: ran unscaled, its gate here not applied (ranked only)"
    return TOKEN_CSS + "".join(rows) + f'<div class="gs-legend">{legend}</div>'


POOLED_CELLS = {  # the `gate_cells` of a statistics table (`TraceDB(cells=...)`), in words for titles
    "applied": "cells whose gate acted (scaled the branch)",
    "all": "all cells (every token's gate, acting or not)",
}


def pooled_cells(table: pd.DataFrame) -> str:
    """Which cells a table's gate statistics pool, in words (tables without `gate_cells` pool all)."""
    cells = str(table["gate_cells"].iloc[0]) if "gate_cells" in table.columns and len(table) else "all"
    return POOLED_CELLS.get(cells, cells)


def layer_profile_figure(layer_table: pd.DataFrame) -> go.Figure:
    """Per layer: gate median with 5-95% band per branch over the pooled cells (named in the title),
    and skip rate; with `applied_share`, the share of the tokens that ran the branch whose gate acted
    (dotted), so a layer whose gates never act (layer 0's attention in scope 'skipped') shows it."""
    titles = ["gate (median, 5-95%)", "skip rate; dotted: share of gates that acted"]
    fig = make_subplots(rows=1, cols=2, subplot_titles=titles)
    fig.update_layout(title=dict(text=f"Gate statistics over {pooled_cells(layer_table)}", font=dict(size=14)))
    for branch, colour in zip(BRANCHES, ("#1f77b4", "#ff7f0e")):
        part = layer_table[layer_table["branch"] == branch]
        fig.add_trace(
            go.Scatter(
                x=part["layer"],
                y=part["gate_p50"],
                name=branch,
                line=dict(color=colour),
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=part["gate_p95"] - part["gate_p50"],
                    arrayminus=part["gate_p50"] - part["gate_p5"],
                ),
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Bar(x=part["layer"], y=part["skip_rate"], name=f"{branch} skip rate", marker_color=colour, opacity=0.7),
            row=1,
            col=2,
        )
        if "applied_share" in part.columns:
            fig.add_trace(
                go.Scatter(
                    x=part["layer"],
                    y=part["applied_share"],
                    name=f"{branch} gates that acted",
                    mode="lines+markers",
                    line=dict(color=colour, dash="dot"),
                    hovertemplate="layer %{x}<br>gate acted at %{y:.1%} of the tokens that ran it<extra></extra>",
                ),
                row=1,
                col=2,
            )
    fig.update_xaxes(title_text="layer")
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(height=400, barmode="group", margin=dict(l=40, r=20, t=80, b=40))
    return fig


def bos_figure(bos_table: pd.DataFrame) -> go.Figure:
    """The first token's gate over the other tokens' per layer, over the pooled cells (in the title)."""
    fig = go.Figure()
    for branch in BRANCHES:
        part = bos_table[bos_table["branch"] == branch]
        fig.add_trace(
            go.Scatter(
                x=part["layer"],
                y=part["ratio"],
                mode="lines+markers",
                name=branch,
                customdata=part["mean_rank"],
                hovertemplate="layer %{x}<br>BOS / others %{y:.3f}<br>mean rank %{customdata:.1f}",
            )
        )
    fig.add_hline(y=1.0, line_dash="dot")
    fig.update_layout(
        title=f"first-token (BOS) gate relative to the other tokens, over {pooled_cells(bos_table)}",
        xaxis_title="layer",
        yaxis_title="BOS gate / mean of others",
        height=340,
    )
    return fig


def token_type_figure(type_table: pd.DataFrame, branch: str = "mlp", value: str = "gate_mean") -> go.Figure:
    """Token type x layer heatmap of `value` for one branch; a gate value's pooled cells in the title."""
    part = type_table[type_table["branch"] == branch].pivot(index="token_type", columns="layer", values=value)
    fig = go.Figure(
        go.Heatmap(
            z=part.to_numpy(),
            x=list(part.columns),
            y=list(part.index),
            colorscale="Viridis",
            colorbar=dict(title=value),
        )
    )
    pooled = f", over {pooled_cells(type_table)}" if value.startswith("gate") else ""
    fig.update_layout(title=f"{value} by token type ({branch}){pooled}", xaxis_title="layer", height=340)
    return fig


def sweep_figure(sweep_df: pd.DataFrame, metric: str = "top1_agreement") -> go.Figure:
    """Quality against net FLOPs saved, one line per method."""
    fig = go.Figure()
    for method, part in sweep_df.groupby("method", sort=False):
        part = part.sort_values("flops_saved")
        fig.add_trace(
            go.Scatter(
                x=part["flops_saved"],
                y=part[metric],
                mode="lines+markers",
                name=method,
                line=dict(color=METHOD_COLOURS.get(method)),
                customdata=part["skip_budget"],
                hovertemplate="budget %{customdata}<br>net FLOPs saved %{x:.1%}<br>"
                + metric
                + " %{y:.4g}<extra>"
                + method
                + "</extra>",
            )
        )
    fig.update_layout(
        xaxis_title="net FLOPs saved (gate cost included)", yaxis_title=metric, height=400, xaxis_tickformat=".0%"
    )
    if metric == "ppl":
        fig.update_yaxes(type="log")
    return fig


def faithfulness_figure(entries: pd.DataFrame, signals: pd.DataFrame) -> go.Figure:
    """Left: each sampled entry's gate against the exact harm of skipping it (log scale). Right: how
    well each signal predicts the harm (Spearman within (layer, branch), averaged), and the harm its
    lowest-ranked entries carry against random choice (1.0) at the budget's skip fraction."""
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["gate vs exact harm of skipping (KL, summed over later positions)", "signals vs harm"],
    )
    for branch in BRANCHES:
        part = entries[entries["branch"] == branch]
        fig.add_trace(
            go.Scattergl(
                x=part["gate"],
                y=part["harm_kl"].clip(lower=1e-6),
                mode="markers",
                name=branch,
                marker=dict(size=4, opacity=0.5),
                customdata=np.stack([part["layer"], part["position"]], -1),
                hovertemplate="layer %{customdata[0]}, position %{customdata[1]}<br>gate %{x:.3f}<br>harm %{y:.3g}",
            ),
            row=1,
            col=1,
        )
    ranked = signals[~signals["signal"].isin(["random", "oracle"])]
    fig.add_trace(go.Bar(x=ranked["signal"], y=ranked["spearman_within"], name="Spearman (within)"), row=1, col=2)
    fig.add_trace(go.Bar(x=signals["signal"], y=signals["vs_random"], name="harm of skipped / random"), row=1, col=2)
    fig.update_xaxes(title_text="gate (importance)", row=1, col=1)
    fig.update_yaxes(title_text="exact harm (KL)", type="log", row=1, col=1)
    fig.update_layout(height=400, barmode="group")
    return fig


def lens_grid_figure(grid, branch: str = "mlp") -> go.Figure:
    """Logit lens of one gated run: layers x tokens, each cell the top prediction decoded from the
    residual entering that layer (colour: its probability); cells where the token skipped
    `branch` ('attn', 'mlp' or 'both': either) marked with x; last row: the output."""
    T, L = len(grid.tokens), grid.n_layers
    x = [f"{i}:{_label(t)}" for i, t in enumerate(grid.tokens)]
    y = [f"L{la}" for la in range(L)] + ["out"]
    text = [[_label(grid.top_text[t][la]) for t in range(T)] for la in range(L + 1)]
    fig = go.Figure(
        go.Heatmap(
            z=grid.top_prob.T,
            x=x,
            y=y,
            text=text,
            texttemplate="%{text}",
            textfont={"size": 9},
            customdata=np.stack([grid.final_rank.T, grid.settled().T.astype(int)], -1),
            colorscale="Blues",
            zmin=0,
            zmax=1,
            colorbar={"title": "top p"},
            hovertemplate=(
                "token %{x}<br>depth %{y}<br>top prediction %{text}<br>p %{z:.3f}"
                "<br>rank of final top-1 %{customdata[0]}<br>settled %{customdata[1]}<extra></extra>"
            ),
        )
    )
    skipped = grid.skipped.any(-1) if branch == "both" else grid.skipped[:, :, BRANCHES.index(branch)]
    pos, layer = np.nonzero(skipped)
    fig.add_trace(
        go.Scatter(
            x=[x[p] for p in pos],
            y=[y[la] for la in layer],
            mode="markers",
            marker={"symbol": "x-thin", "size": 12, "line": {"width": 2, "color": "#d62728"}},
            name=f"skipped {branch}",
            hoverinfo="skip",
        )
    )
    fig.update_layout(
        title=f"Logit lens: top prediction entering each layer (x: skipped {branch})",
        height=max(320, 22 * (L + 1) + 120),
        xaxis={"tickangle": -60},
        legend={"orientation": "h", "y": 1.08},
    )
    return fig


def settled_figure(table: pd.DataFrame) -> go.Figure:
    """Per layer: share of tokens whose final top-1 was already top-1 entering the layer,
    among tokens that skipped a branch vs tokens that ran it (from `settled_table`)."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[f"{b} branch" for b in BRANCHES])
    for col, branch in enumerate(BRANCHES, start=1):
        part = table[table["branch"] == branch]
        for column, name, colour in (
            ("settled_rate_skipped", "skipped", "#d62728"),
            ("settled_rate_ran", "ran", "#1f77b4"),
        ):
            fig.add_trace(
                go.Scatter(
                    x=part["layer"],
                    y=part[column],
                    mode="lines+markers",
                    name=name,
                    legendgroup=name,
                    showlegend=col == 1,
                    line={"color": colour},
                    customdata=part[["skipped_n" if name == "skipped" else "ran_n"]],
                    hovertemplate="layer %{x}<br>settled %{y:.3f}<br>tokens %{customdata[0]}<extra>"
                    + name
                    + "</extra>",
                ),
                row=1,
                col=col,
            )
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(title_text="prediction settled before the layer", range=[0, 1], row=1, col=1)
    fig.update_layout(title="Had the prediction settled? tokens that skipped vs ran each layer", height=380)
    return fig


def attribution_figure(cell: pd.DataFrame, top: int = 12) -> go.Figure:
    """What pushed one gate down (red) or up (blue): the largest terms of its pre-activation
    (`analysis.experiments.attribution.gate_attribution`), the rest summed into one bar, and the bias."""
    shown = cell.head(top)
    rest = float(cell["term"].iloc[top:].sum())
    names = list(shown["component"]) + ([f"{len(cell) - top} others"] if len(cell) > top else []) + ["bias"]
    values = list(shown["term"]) + ([rest] if len(cell) > top else []) + [cell.attrs.get("bias", 0.0)]
    return _term_bars(
        names,
        values,
        "contribution to the gate's pre-activation (red: pushed it down)",
        f"pre-activation {cell.attrs.get('preactivation', float('nan')):+.3f} = sum of the bars",
    )


def _term_bars(names: list[str], values: list[float], xaxis_title: str, title: str) -> go.Figure:
    """Horizontal bars of signed terms, first on top; red pushed the gate down, blue up."""
    fig = go.Figure(
        go.Bar(
            x=values[::-1],
            y=names[::-1],
            orientation="h",
            marker_color=["#d62728" if v < 0 else "#1f77b4" for v in values[::-1]],
            hovertemplate="%{y}: %{x:+.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        height=120 + 22 * len(names), margin=dict(l=20, r=20, t=30, b=20), xaxis_title=xaxis_title, title=title
    )
    return fig


def corpus_skip_heatmap(rates: pd.DataFrame, layer_table: pd.DataFrame | None = None) -> go.Figure:
    """Layer x branch skip rate over a whole corpus (`TraceDB.skip_rates`), with intervals on hover;
    with a `TraceDB.layer_table`, a second row: the share of the tokens that ran each branch whose
    gate acted (scaled it), so the cells where gates mostly only ranked show at a glance."""
    layers = sorted(rates["layer"].unique())
    branches = [b for b in ("attn", "mlp") if b in set(rates["branch"])]
    cell = rates.set_index(["layer", "branch"])
    z = [[cell.loc[(layer, b), "skip_rate"] for layer in layers] for b in branches]
    ci = [
        [f"{cell.loc[(layer, b), 'ci_low']:.3f}-{cell.loc[(layer, b), 'ci_high']:.3f}" for layer in layers]
        for b in branches
    ]
    rows = 1 if layer_table is None else 2
    titles = ["skip rate", "share of the gates that acted (of the tokens that ran the branch)"][:rows]
    fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.25, subplot_titles=titles)
    fig.add_trace(
        go.Heatmap(
            z=z,
            x=layers,
            y=branches,
            customdata=ci,
            colorscale="Reds",
            zmin=0,
            colorbar=dict(title="skip rate", len=1 / rows, y=1, yanchor="top"),
            hovertemplate="layer %{x} %{y}<br>skip rate %{z:.3f}<br>95% CI %{customdata}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    if layer_table is not None:
        share = layer_table.set_index(["layer", "branch"])["applied_share"]
        fig.add_trace(
            go.Heatmap(
                z=[[share.get((layer, b), np.nan) for layer in layers] for b in branches],
                x=layers,
                y=branches,
                colorscale="Greys",
                reversescale=True,
                zmin=0,
                zmax=1,
                colorbar=dict(title="acted", len=0.4, y=0, yanchor="bottom"),
                hovertemplate="layer %{x} %{y}<br>gate acted at %{z:.1%} of the tokens that ran it<extra></extra>",
            ),
            row=2,
            col=1,
        )
    fig.update_xaxes(title_text="layer", row=rows, col=1)
    fig.update_layout(height=220 if rows == 1 else 360, margin=dict(l=40, r=20, t=30, b=40))
    return fig


def attention_source_figure(sources: pd.DataFrame, top: int = 12) -> go.Figure:
    """One attention component's term split by source token (`analysis.experiments.attribution.attention_sources`):
    the largest, the rest summed into one bar."""
    shown = sources.head(top)
    names = [
        f"{p}: {_label(t)}" if p != "stand-in" else f"stand-in ({_label(t)})"
        for p, t in zip(shown["source_position"], shown["token"])
    ]
    values = list(shown["term"])
    if len(sources) > top:
        names.append(f"{len(sources) - top} other sources")
        values.append(float(sources["term"].iloc[top:].sum()))
    return _term_bars(
        names,
        values,
        "contribution through this source token's value vector",
        f"{sources.attrs.get('component', 'attention')}: {sources.attrs.get('component_term', float('nan')):+.3f}"
        " = sum of the bars",
    )


CAUSAL_PANELS = (
    ("gate_mean", "mean gate (all cells)"),
    ("gate_mean_applied", "mean gate where it scaled"),
    ("rel_norm", "|added| / |residual|"),
    ("harm_kl_mean", "harm of one skip (KL per position)"),
)


def causal_figure(table: pd.DataFrame) -> go.Figure:
    """Per layer (from `analysis.experiments.causal.layer_effects`): one panel per measure, the gate
    beside what the branch adds and what skipping it costs, a line per branch."""
    fig = make_subplots(
        rows=len(CAUSAL_PANELS), cols=1, shared_xaxes=True, subplot_titles=[t for _, t in CAUSAL_PANELS]
    )
    for row, (column, _) in enumerate(CAUSAL_PANELS, start=1):
        for branch, colour in (("attn", "#1f77b4"), ("mlp", "#d62728")):
            part = table[table["branch"] == branch]
            fig.add_trace(
                go.Scatter(
                    x=part["layer"],
                    y=part[column],
                    mode="lines+markers",
                    name=branch,
                    legendgroup=branch,
                    showlegend=row == 1,
                    line={"color": colour},
                ),
                row=row,
                col=1,
            )
    fig.update_xaxes(title_text="layer", row=len(CAUSAL_PANELS), col=1)
    fig.update_layout(height=220 * len(CAUSAL_PANELS), margin={"t": 40, "b": 40})
    return fig
