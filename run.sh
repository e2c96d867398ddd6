#!/usr/bin/env bash
# cxr: set up and run.  Works on a fresh clone: creates .venv and installs pinned packages on first use.
#
#   ./run.sh            set up, then start the app (streamlit run app.py) on http://localhost:8501
#   ./run.sh --server.port 8611   options (anything starting with -) go to Streamlit, as with ./run.sh app ...
#   ./run.sh test       set up, then run the test suite (CPU only; what CI runs)
#   ./run.sh test-all   set up, then run every test, the slow ones included
#   ./run.sh cli ...    set up, then run the command line (python -m cxr_core ...)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${CXR_VENV:-.venv}

setup() {
    local want_dev=$1
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
        echo "cxr needs Python 3.10 or newer (found $("$PYTHON" --version 2>&1))." >&2
        exit 1
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        echo "Creating virtual environment in $VENV ..."
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.cxr-installed${want_dev:+-dev}"
    local files=(requirements.txt constraints.txt)
    [ -n "$want_dev" ] && files+=(requirements-dev.txt)
    local stale=""
    [ -f "$stamp" ] || stale=1
    for f in "${files[@]}"; do [ "$f" -nt "$stamp" ] && stale=1; done
    if [ -n "$stale" ]; then
        echo "Installing pinned packages (first run takes a few minutes) ..."
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
        local args=(-r requirements.txt -c constraints.txt)
        [ -n "$want_dev" ] && args+=(-r requirements-dev.txt)
        "$VENV/bin/python" -m pip install --quiet "${args[@]}"
        touch "$stamp"
        # The dev set includes the runtime set: the app and the CLI need no second install.
        if [ -n "$want_dev" ]; then touch "$VENV/.cxr-installed"; fi
    fi
}

command=${1:-app}
case "$command" in
    # Streamlit options without the word "app" (./run.sh --server.port 8611) start the app with them.
    -*) command=app ;;
    *) [ $# -gt 0 ] && shift ;;
esac
case "$command" in
    app)
        setup ""
        exec "$VENV/bin/python" -m streamlit run app.py "$@"
        ;;
    test)
        setup dev
        exec "$VENV/bin/python" -m pytest -m "not slow" "$@"
        ;;
    test-all)
        setup dev
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
    cli)
        setup ""
        exec "$VENV/bin/python" -m cxr_core "$@"
        ;;
    *)
        echo "usage: ./run.sh [app] [STREAMLIT OPTIONS...] | test [PYTEST ARGS...] | test-all | cli COMMAND ..." >&2
        exit 2
        ;;
esac
