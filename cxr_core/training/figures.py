"""Plotly figures of a run: training curves, confusion matrix, ROC, reliability diagram.

Saved as plotly JSON (``plotly.io.read_json`` reads them back), small and self-contained.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from sklearn.metrics import roc_curve

from cxr_core.metrics import Metrics, reliability_bins


def training_figures(history: Sequence[dict[str, Any]]) -> dict[str, go.Figure]:
    epochs = [h["epoch"] + 1 for h in history]
    loss = go.Figure()
    loss.add_scatter(x=epochs, y=[h["train_loss"] for h in history], name="train loss")
    loss.add_scatter(x=epochs, y=[h["val_loss"] for h in history], name="validation loss")
    loss.update_layout(title="Loss per epoch", xaxis_title="epoch", yaxis_title="loss")
    acc = go.Figure()
    acc.add_scatter(x=epochs, y=[h["val_accuracy"] for h in history], name="validation accuracy")
    acc.add_scatter(x=epochs, y=[h.get("val_auroc") for h in history], name="validation macro AUROC")
    acc.update_layout(title="Validation metrics per epoch", xaxis_title="epoch", yaxis_range=[0, 1])
    return {"training_loss": loss, "training_metrics": acc}


def confusion_figure(metrics: Metrics, title: str) -> go.Figure:
    cm = np.array(metrics.confusion_matrix)
    fig = go.Figure(go.Heatmap(z=cm, x=list(metrics.classes), y=list(metrics.classes), colorscale="Blues", text=cm, texttemplate="%{text}", showscale=False))
    fig.update_layout(title=title, xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed")
    return fig


def roc_figure(probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], title: str) -> go.Figure:
    fig = go.Figure()
    targets = [0] if len(classes) == 2 else range(len(classes))
    for i in targets:
        positives = labels == i
        if positives.all() or not positives.any():
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, i])
        fig.add_scatter(x=fpr, y=tpr, name=classes[i], mode="lines")
    fig.add_scatter(x=[0, 1], y=[0, 1], name="chance", mode="lines", line=dict(dash="dot", color="grey"))
    fig.update_layout(title=title, xaxis_title="1 - specificity", yaxis_title="sensitivity")
    return fig


def reliability_figure(probs: np.ndarray, labels: np.ndarray, title: str) -> go.Figure:
    bins = reliability_bins(probs, labels)
    fig = go.Figure()
    fig.add_bar(x=[b["confidence"] for b in bins], y=[b["accuracy"] for b in bins], name="accuracy", width=1 / 18, customdata=[b["n"] for b in bins], hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>n %{customdata}")
    fig.add_scatter(x=[0, 1], y=[0, 1], name="perfect calibration", mode="lines", line=dict(dash="dot", color="grey"))
    fig.update_layout(title=title, xaxis_title="confidence (top class)", yaxis_title="accuracy", xaxis_range=[0, 1], yaxis_range=[0, 1])
    return fig


def evaluation_figures(metrics: Metrics, probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], split: str) -> dict[str, go.Figure]:
    return {
        f"{split}_confusion": confusion_figure(metrics, f"Confusion matrix ({split})"),
        f"{split}_roc": roc_figure(probs, labels, classes, f"ROC ({split})"),
        f"{split}_reliability": reliability_figure(probs, labels, f"Reliability ({split}, ECE {metrics.ece:.3f})"),
    }


def save(figs: dict[str, go.Figure], folders: Sequence[Path]) -> None:
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        for name, fig in figs.items():
            (folder / f"{name}.json").write_text(pio.to_json(fig), encoding="utf-8")
