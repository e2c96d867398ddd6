"""Plotly figures the pages show (no Streamlit here, so they can be tested and reused)."""

from __future__ import annotations

from typing import Callable

import plotly.graph_objects as go

from cxr_core.inference import Prediction

_PREDICTED = "#c0392b"
_OTHER = "#7f8c8d"


def probability_chart(prediction: Prediction, label: Callable[[str], str] = str) -> go.Figure:
    """Horizontal bars of class probabilities; the predicted class highlighted and each
    class's decision threshold drawn as a dashed mark across its bar."""
    classes = list(prediction.classes)
    probs = list(prediction.probabilities)
    names = [label(c) for c in classes]
    colours = [_PREDICTED if c == prediction.predicted else _OTHER for c in classes]
    fig = go.Figure(
        go.Bar(
            x=probs,
            y=names,
            orientation="h",
            marker_color=colours,
            text=[f"{p:.1%}" for p in probs],
            textposition="outside",
            cliponaxis=False,
            hovertemplate="%{y}: %{x:.3f}<extra></extra>",
        )
    )
    for i, cls in enumerate(classes):
        threshold = prediction.thresholds.get(cls)
        if threshold is None:
            continue
        fig.add_shape(
            type="line",
            x0=threshold,
            x1=threshold,
            y0=i - 0.45,
            y1=i + 0.45,
            line=dict(color="black", width=2, dash="dash"),
        )
        # The y axis is reversed (first class on top), so i - 0.45 is the bar's upper edge: the
        # label sits in the gap above its bar, not in grey on the red bar where it was unreadable.
        fig.add_annotation(
            x=threshold, y=i - 0.45, text=f"threshold {threshold:.2f}", showarrow=False, yanchor="bottom",
            font=dict(size=11, color="#222222"),
        )
    fig.update_layout(
        xaxis=dict(range=[0, 1.12], tickformat=".0%", title="probability"),
        yaxis=dict(autorange="reversed"),
        height=96 + 48 * len(classes),
        margin=dict(l=10, r=10, t=26, b=40),  # room above the first bar for its threshold label
        showlegend=False,
    )
    return fig
