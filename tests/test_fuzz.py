"""Fuzz the image reader with hypothesis: mutated real files must read or fail with a CxrError.

Seeds are real files (pydicom-data's RG1 chest in uncompressed and JPEG 2000, a JPEG-LS,
an RLE and a multi-frame DICOM, and PNG/JPEG/TIFF renderings of the chest), mutated by
bit flips, byte overwrites, insertions, deletions and truncation. Marked ``slow``; the
budget is ``CXR_FUZZ_EXAMPLES`` examples per seed (default 300). The run prints how many
inputs were tried, how many read, how many were refused, and any other exception (a
finding, which fails the test).
"""

from __future__ import annotations

import io
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cxr_core.errors import CxrError
from cxr_core.imaging.io import read_image

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")
data_store = pytest.importorskip("data_store")

EXAMPLES = int(os.environ.get("CXR_FUZZ_EXAMPLES", "300"))
DATA = Path(data_store.__file__).parent / "data"


def _seeds() -> dict[str, bytes]:
    from PIL import Image

    seeds = {name: (DATA / name).read_bytes() for name in ("RG1_UNCR.dcm", "RG1_J2KR.dcm", "JPEG-LL.dcm", "emri_small_RLE.dcm", "US1_J2KR.dcm")}
    chest = read_image(DATA / "RG1_UNCR.dcm").to_uint8()[::8, ::8]
    for fmt in ("PNG", "JPEG", "TIFF"):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(chest)).save(buffer, format=fmt)
        seeds[f"chest.{fmt.lower()}"] = buffer.getvalue()
    return seeds


SEEDS = _seeds()

# One mutation: (kind, relative position, payload).
mutation = st.tuples(
    st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]),
    st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    st.binary(min_size=1, max_size=64),
)


def _mutate(data: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, payload in mutations:
        if not out:
            break
        # Bias half of the edits into the header, where parsers make their decisions.
        position = int(where * (min(len(out), 4096) if where < 0.5 else len(out) - 1))
        position = min(position, len(out) - 1)
        if kind == "flip":
            out[position] ^= 1 << (payload[0] % 8)
        elif kind == "overwrite":
            out[position : position + len(payload)] = payload
        elif kind == "insert":
            out[position:position] = payload
        elif kind == "delete":
            del out[position : position + len(payload)]
        else:
            del out[position:]
    return bytes(out)


@pytest.mark.slow
@pytest.mark.parametrize("seed", sorted(SEEDS))
def test_mutated_files_read_or_fail_cleanly(seed: str) -> None:
    source = SEEDS[seed]
    tally: Counter[str] = Counter()
    findings: list[str] = []

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(st.lists(mutation, min_size=1, max_size=8))
    def run(mutations: list[tuple[str, float, bytes]]) -> None:
        data = _mutate(source, mutations)
        started = time.perf_counter()
        try:
            image = read_image(data)
        except CxrError:
            tally["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - a finding
            findings.append(f"{seed}: {type(exc).__name__}: {exc}"[:300])
            tally["finding"] += 1
        else:
            assert image.pixels.ndim == 2 and np.isfinite(image.pixels).all()
            tally["read"] += 1
        elapsed = time.perf_counter() - started
        if elapsed > 10:
            findings.append(f"{seed}: took {elapsed:.1f} s")
        tally["tried"] += 1

    run()
    print(f"\nfuzz {seed}: {dict(tally)}")
    assert not findings, findings[:10]
