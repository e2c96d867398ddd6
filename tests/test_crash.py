"""Kill -9 mid-work, then restart: the active model loads, the database is consistent.

A worker process does what the app does all day (promote, roll back, predict, explain,
write audit and review rows) in a tight loop; it is killed without warning at several
moments, and after each kill a fresh process checks the state. The training job's kill
and resume is tested in test_jobs.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_admin_core import _candidate, registry_env  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    """
    import sys, numpy as np
    from cxr_core.state import audit
    from cxr_core.state.feedback import Feedback, record_feedback
    from cxr_core.explain.cam import explain
    from cxr_core.inference import predict
    from cxr_core.imaging.io import read_image
    from cxr_core.models.loading import installed_models, load_model
    from cxr_core.models.versions import promote, rollback
    from PIL import Image
    import io
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8)).save(buffer, format="PNG")
    film = read_image(buffer.getvalue())
    i = 0
    while True:
        i += 1
        if i % 2:
            promote("dn", "2.0.0", user="worker", gate=False)
        else:
            rollback("dn", user="worker")
        model = load_model(installed_models()[0].path, device="cpu")
        prediction = predict(model, [film])[0]
        explain(model, film, method="gradcam")
        audit.record("prediction", user="worker", image_sha256=film.sha256, model=model.key,
                     details={"p": prediction.as_dict(), "i": i})
        record_feedback(Feedback(model.key, film.sha256, "gradcam", prediction.predicted or "covid", "features", prediction.predicted,
                                 True, True, f"loop {i}", user="worker"))
        print(i, flush=True)
    """
)


def _check_state(env: dict[str, str]) -> dict[str, object]:
    """In a fresh process: the app's model loads and predicts; the database checks out."""
    code = textwrap.dedent(
        """
        import json, sqlite3
        from cxr_core.state.audit import verify_chain
        from cxr_core.state.db import database_path
        from cxr_core.models.loading import installed_models, load_model
        from cxr_core.models.versions import read_pointer
        import torch
        models = installed_models()
        model = load_model(models[0].path, device="cpu")
        out = model.network(torch.zeros(1, model.manifest.input.channels, *model.manifest.input.size))
        conn = sqlite3.connect(database_path())
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        chain = verify_chain()
        reviews = conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0]
        # A review writes its audit row too: the loop's rows are its predictions.
        predictions = conn.execute("SELECT COUNT(*) FROM audit WHERE action = 'prediction'").fetchone()[0]
        print(json.dumps({"version": model.manifest.version, "finite": bool(torch.isfinite(out).all()), "integrity": integrity,
                          "chain_ok": chain.ok, "rows": predictions, "reviews": reviews, "pointer": read_pointer().get("active", {})}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kill_mid_promotion_and_prediction_leaves_a_working_app(registry_env: Path) -> None:  # noqa: F811
    _candidate("2.0.0", accuracy=0.93, covid_recall=0.96)
    env = {**os.environ}
    seen_rows = 0
    # Kill after the k-th completed loop plus a little: each loop promotes or rolls back,
    # loads, predicts, explains and writes two rows, so the kills land at varied points.
    for kills, (loops, extra) in enumerate(((1, 0.0), (2, 0.1), (3, 0.3), (2, 0.02)), start=1):
        proc = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        assert proc.stdout is not None
        done = 0
        deadline = time.time() + 240
        while done < loops and time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            done = int(line)
        time.sleep(extra)
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert done == loops, err[-3000:]
        state = _check_state(env)
        assert state["version"] in ("1.0.0", "2.0.0") and state["finite"], state
        assert state["integrity"] == "ok" and state["chain_ok"], state
        assert state["rows"] >= seen_rows + loops and state["reviews"] >= state["rows"] - kills, state  # nothing committed was lost
        seen_rows = int(state["rows"])  # type: ignore[arg-type]
    # The pointer and the registry folder agree: no temporary files left as the active model.
    registry = registry_env / "var" / "registry"
    assert not [p for p in registry.rglob("*") if p.name.startswith(".active.") and p.suffix != ".lock"]


def test_a_sqlite_file_cut_short_is_reported_not_crashed(tmp_path: Path) -> None:
    """A database truncated by a disk failure: the audit check says so in words."""
    from cxr_core.state.audit import record, verify_chain

    path = tmp_path / "a.sqlite3"
    for i in range(50):
        record("prediction", details={"i": i, "pad": "x" * 500}, db=path)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises((sqlite3.DatabaseError, Exception)) as caught:
        verify_chain(path)
    assert "malformed" in str(caught.value) or "corrupt" in str(caught.value).lower() or "not a database" in str(caught.value)
