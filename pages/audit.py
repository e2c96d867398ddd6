"""Admin · Audit: filter the audit trail, check its hash chain, export CSV."""

from __future__ import annotations

from datetime import date, timedelta

import pandas as pd
import streamlit as st

from cxr_core.state import audit
from pages._common import current_user, enter_page, guarded

enter_page(role="admin")
st.title("Audit trail")
user, role = current_user()
st.caption(
    "Every prediction, export, gate override, sign-in and admin action, append-only and hash-chained: editing or "
    "deleting a row breaks the chain from that row on. Images are named by their SHA-256; no patient identifiers are stored."
)

with guarded("checking the audit trail"):
    report = audit.verify_chain()
    if report.ok:
        st.success(f"Chain intact: {report.rows} entries verified.", icon=":material/verified:")
    else:
        st.error(f"Chain BROKEN at entry {report.first_bad_id}: {report.problem}. Entries from there on cannot be trusted; "
                 "keep the database file as evidence and tell your security officer.")

ANY = "(any)"
with st.form("audit_filter"):
    a, b, c = st.columns(3)
    action = a.selectbox("Action", [ANY, *audit.distinct_values("action")])
    who = b.selectbox("User", [ANY, *audit.distinct_values("user")])
    model = c.selectbox("Model", [ANY, *audit.distinct_values("model")])
    d, e, f = st.columns(3)
    today = date.today()
    since = d.date_input("From (UTC)", value=today - timedelta(days=30))
    until = e.date_input("To (UTC, inclusive)", value=today)
    image = f.text_input("Image SHA-256 (prefix)", max_chars=64)
    limit = st.number_input("At most", min_value=10, max_value=100_000, value=1000, step=100)
    st.form_submit_button("Filter", icon=":material/filter_alt:")

with guarded("reading the audit trail"):
    rows = audit.entries(
        action=None if action == ANY else action, user=None if who == ANY else who, model=None if model == ANY else model,
        image_sha256=image or None, since=since.isoformat() if since else None,
        until=(until + timedelta(days=1)).isoformat() if until else None, limit=int(limit),
    )
    st.write(f"{len(rows)} entr{'y' if len(rows) == 1 else 'ies'}" + (" (limit reached; narrow the filter)" if len(rows) == limit else ""))
    if rows:
        frame = pd.DataFrame(
            [{"id": r.id, "time (UTC)": r.created[:19].replace("T", " "), "user": r.user, "role": r.role, "action": r.action,
              "model": r.model or "", "image": (r.image_sha256 or "")[:12], "details": ", ".join(f"{k}={v}" for k, v in r.details.items())}
             for r in rows]
        )
        st.dataframe(frame, hide_index=True, width="stretch")
        chosen = st.selectbox("Show entry", [r.id for r in rows], format_func=lambda i: f"#{i}")
        entry = next(r for r in rows if r.id == chosen)
        st.json({"id": entry.id, "created": entry.created, "user": entry.user, "role": entry.role, "action": entry.action,
                 "image_sha256": entry.image_sha256, "model": entry.model, "details": entry.details,
                 "prev_hash": entry.prev_hash, "hash": entry.hash}, expanded=True)
        if st.download_button("Download CSV", audit.to_csv(rows), file_name="cxr-audit.csv", mime="text/csv", icon=":material/download:"):
            audit.record("export_audit", user=user, role=role, details={"rows": len(rows), "action": action, "user": who})
