"""How much of a shipped classifier's COVID-19 call is carried by early feature statistics?

    python scripts/probe_style.py --model densenet121-covid3 \
        --recipients ../shared/data/cxr-extra --recipient-source openist \
        --donors ../shared/data/cxr:val:normal [--json OUT]

A "style transplant": every recipient film goes through the network with the channel
mean and spread of its early feature maps (the layers MixStyle acts on,
cxr_core.training.trainer.mix_style_layers) replaced by those of a donor film drawn at
random (or, with ``--reference mean``, the donors' average statistics, the same for every
film: a test-time normalisation), content untouched. Reported: recipient films called COVID-19 at the model's own
threshold as they are and after the transplant. If films of an unseen source stop being
called COVID-19 once they carry the statistics of the training normals, the call rests
on "style" (exposure, processing, texture), which MixStyle aims to make useless.
A probe of the shipped model; nothing is fitted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from style_reference_eval import Transplant  # noqa: E402

from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.imaging.preprocess import to_batch  # noqa: E402
from cxr_core.inference import decide, logits_to_probabilities  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402
from cxr_core.training.dataset import scan_folder  # noqa: E402

POSITIVE = "covid"


def _records(target: str, source: str | None = None) -> list:
    folder, _, rest = target.partition(":")
    split, _, label = rest.partition(":")
    return [r for r in scan_folder(folder)
            if (not split or r.split == split) and (not label or r.label == label) and (source is None or r.source == source)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--recipients", required=True, metavar="FOLDER[:SPLIT[:LABEL]]")
    parser.add_argument("--recipient-source")
    parser.add_argument("--donors", required=True, metavar="FOLDER[:SPLIT[:LABEL]]")
    parser.add_argument("--reference", choices=["random", "mean"], default="random",
                        help="each recipient takes a random donor's statistics, or all take the donors' mean")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json")
    args = parser.parse_args()

    model = load_model(resolve_model(args.model).path)
    recipients = _records(args.recipients, args.recipient_source)
    donors = _records(args.donors)
    rng = np.random.default_rng(args.seed)
    drawn = rng.integers(0, len(donors), len(recipients))
    spec = model.manifest.input
    t = Transplant(model)  # the hooks of style_reference_eval.py: record a batch's statistics, or give it others'
    layers = t.layers

    def called(logits: np.ndarray) -> int:
        return sum(decide(row, model.manifest) == POSITIVE for row in logits_to_probabilities(torch.from_numpy(logits), model.manifest))

    as_is = transplanted = 0
    with t.hooked():
        reference = None
        if args.reference == "mean":
            # Every donor once; per layer, the mean over donors of each channel's mean and spread.
            per_batch = [t.record(to_batch([read_image(r.path).pixels for r in donors[start : start + args.batch_size]], spec))
                         for start in range(0, len(donors), args.batch_size)]
            reference = [(torch.cat([b[k][0] for b in per_batch]).mean(0, keepdim=True), torch.cat([b[k][1] for b in per_batch]).mean(0, keepdim=True))
                         for k in range(len(layers))]
        for start in range(0, len(recipients), args.batch_size):
            batch = recipients[start : start + args.batch_size]
            x = to_batch([read_image(r.path).pixels for r in batch], spec)
            if reference is None:
                recorded = t.record(to_batch([read_image(donors[i].path).pixels for i in drawn[start : start + len(batch)]], spec))
            else:
                recorded = reference
            as_is += called(t.logits(x, None))
            transplanted += called(t.logits(x, recorded))
    result = {"model": model.manifest.key, "layers": list(layers), "n": len(recipients),
              "called_covid_as_is": int(as_is), "called_covid_with_donor_statistics": int(transplanted),
              "recipients": args.recipients + (f" ({args.recipient_source})" if args.recipient_source else ""), "donors": args.donors, "reference": args.reference}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
