"""Admin · Training data: upload a labelled folder or zip, check it before any training."""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from cxr_core.explain.overlay import fit_within
from cxr_core.imaging.io import read_image
from cxr_core.state import audit
from cxr_core.state.datasets import (
    Dataset,
    confirm_dataset,
    delete_dataset,
    list_datasets,
    store_upload,
    validate_dataset,
)
from pages._common import choose_evaluation_set, current_user, enter_page, guarded

enter_page(role="admin")
st.title("Training data")
user, role = current_user()
st.caption(
    "One sub-folder per class (optionally under train/val/test, optionally with a metadata.csv giving split, "
    "patient_id and source). Any image format the app reads, DICOM included."
)

with st.expander("Upload a labelled dataset", expanded=not list_datasets()):
    name = st.text_input("Name", placeholder="e.g. Site B films, 2026 Q3")
    folder_tab, zip_tab = st.tabs(["A folder", "A zip archive"])
    with folder_tab:
        files = st.file_uploader("Choose the dataset's folder", accept_multiple_files="directory", key="data_folder")
    with zip_tab:
        archive = st.file_uploader("Choose a .zip of the dataset's folder", type=["zip"], key="data_zip")
    if st.button("Store the upload", type="primary", disabled=not (files or archive) or not name.strip()):
        with guarded("storing the upload"):
            if archive is not None:
                dataset = store_upload(name.strip(), user, archive=archive.getvalue())
            else:
                dataset = store_upload(name.strip(), user, files=[(f.name, f.getvalue()) for f in files or []])
            audit.record("upload_dataset", user=user, role=role, details={"dataset": dataset.id, "name": dataset.name,
                                                                            "files": sum(1 for _ in dataset.root.rglob("*") if _.is_file())})
            st.success(f"Stored as {dataset.id}; its check follows below.")
            st.session_state["data_selected"] = dataset.id

datasets = list_datasets()
if not datasets:
    st.info("No dataset uploaded yet.")
    st.stop()

by_id = {d.id: d for d in datasets}
ids = list(by_id)
selected = st.selectbox(
    "Dataset", ids, index=ids.index(st.session_state["data_selected"]) if st.session_state.get("data_selected") in ids else 0,
    format_func=lambda i: f"{by_id[i].name} — uploaded {by_id[i].created[:16]} by {by_id[i].uploaded_by} ({i})",
)
dataset: Dataset = by_id[selected]
eval_dir = choose_evaluation_set("data_eval_set", exclude=dataset.id)


def offer_delete(where: object) -> None:
    """Delete, behind a confirmation: offered for every dataset, refused ones included."""
    sure = where.checkbox(f"Yes, delete {dataset.name!r} and its files", key=f"delete-sure-{dataset.id}")  # type: ignore[attr-defined]
    if where.button("Delete this dataset", disabled=not sure, key=f"delete-{dataset.id}"):  # type: ignore[attr-defined]
        with guarded("deleting the dataset"):
            delete_dataset(dataset)
            audit.record("delete_dataset", user=user, role=role, details={"dataset": dataset.id})
            st.session_state.pop("data_selected", None)
            st.rerun()


report = dataset.report()
if report is None or st.button("Check again"):
    with guarded("checking the dataset"), st.spinner("Reading every image, looking for duplicates and overlaps…"):
        report = validate_dataset(dataset, eval_dir)
if report is None:
    offer_delete(st)
    st.stop()

if not report.get("ok"):
    for problem in report.get("problems", []):
        st.error(problem)
    st.info("This dataset cannot be used for training as it is. Fix the folders and upload it again, or delete it.")
    offer_delete(st)
    st.stop()
for problem in report.get("problems", []):
    st.error(problem)
for note in report.get("notes", []):
    st.warning(note)
if report.get("evaluation_overlap"):
    st.warning(f"{report['evaluation_overlap']} image(s) also appear in the evaluation set: they will be left out of training.")

counts = report.get("counts", {})
fig = go.Figure()
for split, per_class in counts.items():
    fig.add_bar(name=split, x=list(per_class), y=list(per_class.values()))
fig.update_layout(barmode="stack", title="Images per class", yaxis_title="images", height=360)
st.plotly_chart(fig, width="stretch")
cols = st.columns(4)
cols[0].metric("Unreadable files", report.get("unreadable", 0))
cols[1].metric("Duplicates removed", report.get("exact_duplicates_removed", 0) + report.get("near_duplicates_removed", 0))
cols[2].metric("In the evaluation set", report.get("evaluation_overlap", "—"))
cols[3].metric("Class imbalance", f"{report.get('imbalance_ratio', 1):.1f}x")
if report.get("unreadable_files"):
    with st.expander("Unreadable files"):
        st.table([{"file": f, "why": why} for f, why in report["unreadable_files"]])

st.subheader("A few images per class")
for label, paths in report.get("thumbnails", {}).items():
    st.markdown(f"**{label}**")
    columns = st.columns(max(1, len(paths)))
    for column, relative in zip(columns, paths):
        try:
            column.image(fit_within(read_image(dataset.root / relative).to_uint8(), 256), caption=Path(relative).name, width="stretch")
        except Exception:  # noqa: BLE001 - a thumbnail must not break the page
            column.caption(f"{relative}: cannot be shown")

confirmed = dataset.confirmation()
if confirmed:
    st.caption(f"Confirmed for training by {confirmed['user']} at {confirmed['time']}.")
left, right = st.columns(2)
if left.button("Use this dataset for training", type="primary", disabled=not report.get("ok")):
    with guarded("confirming the dataset"):
        confirm_dataset(dataset, user)
        st.session_state["training_dataset"] = dataset.id
        audit.record("confirm_dataset", user=user, role=role, details={"dataset": dataset.id})
        st.switch_page("pages/training.py")
offer_delete(right)
