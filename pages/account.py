"""Account: sign in and out (users file with bcrypt hashes, or the organisation's OIDC login)."""

from __future__ import annotations

import streamlit as st

from cxr_core.state import audit
from cxr_core.state.users import AuthError, authenticate, users_file
from pages._common import ENTRY_FLAG, current_user, guarded, oidc_configured, restore_oidc_user

if not st.session_state.get(ENTRY_FLAG):
    st.switch_page("app.py")

st.title("Account")
user, role = current_user()


if user != "anonymous":
    st.success(f"Signed in as **{user}** ({role}).")
    if st.button("Sign out"):
        audit.record("sign_out", user=user, role=role)
        for key in ("user", "role"):
            st.session_state.pop(key, None)
        if oidc_configured() and getattr(st.user, "is_logged_in", False):
            st.logout()
        st.rerun()
    st.stop()

if oidc_configured():
    if getattr(st.user, "is_logged_in", False):
        restore_oidc_user("sign_in")
        st.rerun()
    st.button("Sign in with your organisation's account", on_click=st.login, type="primary")
    st.divider()

with st.form("sign_in"):
    name = st.text_input("User name", autocomplete="username")
    password = st.text_input("Password", type="password", autocomplete="current-password")
    submitted = st.form_submit_button("Sign in", type="primary")
if submitted:
    with guarded("signing in"):
        try:
            signed = authenticate(name.strip(), password)
        except AuthError as exc:
            audit.record("sign_in_failed", user=name.strip()[:64] or "?", details={"reason": str(exc)})
            st.error(str(exc))
        else:
            st.session_state["user"], st.session_state["role"] = signed.name, signed.role
            audit.record("sign_in", user=signed.name, role=signed.role, details={"method": "password"})
            st.rerun()

if not users_file().exists():
    st.info(
        "No users are set up yet. An administrator creates the first account on the server:  \n"
        "`python -m cxr_core users add NAME --role admin` (see the README)."
    )
