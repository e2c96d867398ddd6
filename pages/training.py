"""Admin · Training: launch a fine-tuning or training job, watch it, cancel or resume it."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import plotly.graph_objects as go
import streamlit as st

from cxr_core import audit
from cxr_core.datasets import list_datasets
from cxr_core.jobs import (
    CANCELLED,
    FAILED,
    FINISHED,
    QUEUED,
    RUNNING,
    JobSpec,
    cancel,
    create_job,
    launch,
    list_jobs,
    log_tail,
    read_spec,
    read_state,
)
from cxr_core.registry import ARCHITECTURES
from cxr_core.training.augment import MAX_ASPECT, MAX_EDGE_CROP
from cxr_core.training.run import RunDir
from cxr_core.versions import list_versions
from pages._common import current_user, enter_page, guarded

enter_page(role="admin")
st.title("Training")
user, role = current_user()

datasets = [d for d in list_datasets() if d.trainable]  # checked, and confirmed by an admin
versions = list_versions()

with st.expander("Launch a job", expanded=not any(s.state in (RUNNING, QUEUED) for _, _, s in list_jobs())):
    if not datasets:
        st.info("Upload, check and confirm a dataset on the Training data page first (\"Use this dataset for training\").")
    else:
        by_id = {d.id: d for d in datasets}
        ids = list(by_id)
        preferred = st.session_state.get("training_dataset")
        dataset_id = st.selectbox("Dataset", ids, index=ids.index(preferred) if preferred in ids else 0,
                                  format_func=lambda i: f"{by_id[i].name} ({i})")
        start = st.radio("Start from", ["A registered model (fine-tune)", "An architecture (from scratch)"], horizontal=True)
        if start.startswith("A registered") and versions:
            base_key = st.selectbox("Model", [v.key for v in versions], format_func=lambda k: k + (" (active)" if any(v.key == k and v.active for v in versions) else ""))
            base = next(v for v in versions if v.key == base_key)
            arch, classes, binary = base.manifest.architecture, tuple(base.manifest.classes), base.manifest.classes[0] if base.manifest.head == "sigmoid" else None
            model_id = base.model_id
            size_default = base.manifest.input.size[0]
        else:
            base_key = None
            arch = st.selectbox("Architecture", sorted(a for a in ARCHITECTURES if not a.endswith("-test")))
            kind = st.radio("Task", ["COVID-19 / normal / viral pneumonia", "COVID-19 vs other"], horizontal=True)
            binary = "covid" if kind.endswith("other") else None
            classes = ("covid", "other") if binary else ("covid", "normal", "viral_pneumonia")
            model_id = st.text_input("Model id", value=f"{arch}-{'covid-binary' if binary else 'covid3'}")
            size_default = 224
        c = st.columns(4)
        epochs = c[0].number_input("Epochs", 1, 200, 5)
        size = c[1].number_input("Image size (px)", 64, 512, size_default, step=32)
        batch = c[2].number_input("Batch size", 2, 256, 32)
        lr = c[3].number_input("Peak learning rate", 1e-6, 1e-1, 3e-4 if base_key else 2e-3, format="%.6f")
        c = st.columns(4)
        balance = c[0].selectbox("Class balance", ["weights", "sampler", "source", "none"],
                               help="source: weights that balance every (source, label) group of metadata.csv")
        freeze = c[1].number_input("Frozen-backbone epochs", 0, 50, 1 if base_key else 0)
        decay = c[2].number_input("Per-stage LR factor", 0.1, 1.0, 0.7 if base_key else 1.0, step=0.05)
        patience = c[3].number_input("Early stopping (epochs, 0 = off)", 0, 50, 0)
        c = st.columns(4)
        augment = c[0].toggle("Augmentation", value=True)
        hflip = c[1].toggle("Horizontal flips", value=False, help="Off by default: flips swap laterality.")
        mask_text = c[2].toggle("Mask burned-in text", value=False,
                                help="Inpaint detected text and markers on every training film; the model then does the same before "
                                     "every prediction, so it cannot learn a hospital's labels instead of the lungs. "
                                     "A model fine-tuned from a masked one stays masked.")
        sensitivity = c[3].number_input("COVID sensitivity target", 0.5, 0.999, 0.95)
        c = st.columns(5)
        zoom_min = c[0].number_input("Zoom from", 0.5, 1.0, 0.9, step=0.05, disabled=not augment,
                                     help="Zoom augmentation range; above 1 frames the chest more tightly. Models trained on one "
                                          "collection's framing learn it: a wider range (e.g. 0.85 to 1.35) breaks that shortcut.")
        zoom_max = c[1].number_input("Zoom to", 1.0, 2.0, 1.1, step=0.05, disabled=not augment)
        aspect = c[2].number_input("Aspect stretch", 0.0, MAX_ASPECT, 0.0, step=0.05, disabled=not augment,
                                   help="Width/height stretched by up to 1 + this either way (films squeezed to a square from "
                                        "different shapes).")
        edge_crop = c[3].number_input("Edge crop", 0.0, MAX_EDGE_CROP, 0.0, step=0.05, disabled=not augment,
                                      help="Each edge cropped away by up to this share of the side, independently, and the "
                                           "rest stretched back: collimation moves one edge at a time (neck or abdomen in "
                                           "or out of the field).")
        average_every = c[4].number_input("Weight averaging (every N steps, 0 = off)", 0, 10_000, 0,
                                          help="Export the average of the weights taken every N steps of the run (SWA), with "
                                               "batch-norm statistics recomputed, instead of the best epoch. Compare the "
                                               "candidate's evaluation before promoting it: on the shared data it did not help.")
        labels = (by_id[dataset_id].report() or {}).get("classes") or []
        aux_choices = [label for label in labels if label not in classes] if not binary else []
        aux = st.multiselect("Auxiliary classes (trained, then dropped)", aux_choices, default=[],
                             disabled=not aux_choices,
                             help="Other labelled folders of this dataset trained as extra outputs and removed from the "
                                  "exported model. Bacterial pneumonia this way shows the network children with pneumonia "
                                  "that is not viral, so being a child cannot stand in for viral pneumonia.")
        eval_dir = st.text_input("Evaluation set (fixed; never trained on)", value=os.environ.get("CXR_EVAL_DIR", ""))
        version = st.text_input("New version name", value=datetime.now(timezone.utc).strftime("%Y.%m.%d-%H%M"))
        if st.button("Launch", type="primary"):
            with guarded("launching the job"):
                spec = JobSpec(
                    dataset=str(by_id[dataset_id].root), arch=arch, model_id=model_id.strip(), version=version.strip(), user=user,
                    classes=classes, binary_positive=binary, aux_classes=tuple(aux), base_model=base_key, schedule=((int(size), int(epochs)),),
                    batch_size=int(batch), lr=float(lr), balance=balance, freeze_epochs=int(freeze), layer_decay=float(decay),
                    patience=int(patience), target_sensitivity=float(sensitivity), augment=augment, hflip=hflip,
                    zoom=(float(zoom_min), float(zoom_max)), aspect=float(aspect), edge_crop=float(edge_crop),
                    average_every=int(average_every),
                    eval_dir=eval_dir.strip() or None, mask_burned_in=mask_text,
                )
                job_dir = create_job(spec)
                try:
                    launch(job_dir)
                except Exception:
                    import shutil

                    shutil.rmtree(job_dir, ignore_errors=True)
                    raise
                audit.record("launch_job", user=user, role=role, model=f"{spec.model_id}@{spec.version}",
                             details={"job": spec.job_id, "dataset": dataset_id, "base": base_key, "arch": arch, "epochs": int(epochs)})
                st.success(f"Job {spec.job_id} started.")


def _curves(events: list[dict]) -> go.Figure:
    epochs = [e for e in events if e["event"] == "epoch"]
    steps = [e for e in events if e["event"] == "step"]
    fig = go.Figure()
    if steps:
        fig.add_scatter(x=[e["epoch"] + e["step"] / e["steps"] for e in steps], y=[e["loss"] for e in steps], name="training loss (running)", mode="lines")
    if epochs:
        fig.add_scatter(x=[e["epoch"] + 1 for e in epochs], y=[e["val_loss"] for e in epochs], name="validation loss", mode="lines+markers")
        fig.add_scatter(x=[e["epoch"] + 1 for e in epochs], y=[e["val_accuracy"] for e in epochs], name="validation accuracy", mode="lines+markers", yaxis="y2")
    fig.update_layout(height=320, xaxis_title="epoch", yaxis_title="loss", yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1]), margin=dict(t=30))
    return fig


@st.fragment(run_every=2)
def job_panel(job_dir_name: str) -> None:
    job_dir = next((d for d, _, _ in list_jobs() if d.name == job_dir_name), None)
    if job_dir is None:
        st.caption("The job was removed.")
        return
    spec, state = read_spec(job_dir), read_state(job_dir)
    events = RunDir(job_dir / "run").events()
    last_step = next((e for e in reversed(events) if e["event"] == "step"), None)
    total_epochs = sum(e for _, e in spec.schedule)
    done_epochs = sum(e["event"] == "epoch" for e in events)
    badge = {RUNNING: "🟢 running", QUEUED: "⏳ starting", FINISHED: "✅ finished", FAILED: "❌ failed", CANCELLED: "⏹ cancelled"}[state.state]
    st.markdown(f"**{spec.model_id}@{spec.version}** — {badge} — device {state.device or '…'} — by {spec.user}, {spec.created[:16]}")
    if last_step is not None and state.state in (RUNNING, QUEUED):
        fraction = (last_step["epoch"] + last_step["step"] / last_step["steps"]) / total_epochs
        eta = last_step.get("eta_s")
        st.progress(min(1.0, fraction), text=f"epoch {last_step['epoch'] + 1}/{total_epochs}, step {last_step['step']}/{last_step['steps']}, "
                    f"{last_step.get('images_per_s', 0):.1f} images/s" + (f", about {eta / 60:.0f} min left" if eta else ""))
    elif state.state in (RUNNING, QUEUED):
        st.progress(0.0, text="Reading and checking the data…")
    else:
        st.progress(done_epochs / total_epochs if total_epochs else 0.0, text=f"{done_epochs}/{total_epochs} epochs")
    if state.error:
        (st.error if state.state == FAILED else st.info)(state.error)
    if events:
        st.plotly_chart(_curves(events), width="stretch", key=f"curves-{job_dir.name}-{len(events)}")
    cols = st.columns(3)
    if state.state in (RUNNING, QUEUED) and cols[0].button("Cancel", key=f"cancel-{job_dir.name}"):
        cancel(job_dir)
        audit.record("cancel_job", user=user, role=role, details={"job": job_dir.name})
    if state.state in (FAILED, CANCELLED) and cols[0].button("Resume from the last checkpoint", key=f"resume-{job_dir.name}"):
        with guarded("resuming the job"):
            launch(job_dir)
            audit.record("resume_job", user=user, role=role, details={"job": job_dir.name})
    if state.state == FINISHED and state.candidate:
        cols[1].page_link("pages/models.py", label=f"Review candidate {state.candidate}", icon=":material/fact_check:")
    with st.expander("Log"):
        st.code(log_tail(job_dir) or "(empty)", language=None)


jobs = list_jobs()
if not jobs:
    st.info("No job yet.")
    st.stop()
st.subheader("Jobs")
names = [d.name for d, _, _ in jobs]
chosen = st.selectbox("Job", names, format_func=lambda n: next(f"{spec.model_id}@{spec.version} — {state.state} ({n})" for d, spec, state in jobs if d.name == n))
job_panel(chosen)
