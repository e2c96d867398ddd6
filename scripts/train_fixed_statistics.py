"""Train with fixed early feature statistics (R, docs/experiments/2026-12-06-fixed-statistics-loso.md;
the rule there was written before this ran), then score held-out films through the same network.

    python scripts/train_fixed_statistics.py --out var/cand/R --size 160 -- TRAIN_ARGS...
    python scripts/train_fixed_statistics.py --out var/cand/R --score-only

Every network ``cxr_core.training.trainer`` builds (training, validation, the export and its
calibration) gets forward hooks that give the outputs of the MixStyle layers the reference's
channel mean and spread (the mean over 256 training normals, recorded through the ``--init``
network at ``--size``). An experiment: the app's own loading path does not apply the reference,
so the candidate is scored here, with its own temperature and threshold.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from style_reference_eval import Transplant, _bank, _read_batches, _records  # noqa: E402

from cxr_core.inference import decide, logits_to_probabilities, predict_logits  # noqa: E402
from cxr_core.models.loading import load_model, resolve_model  # noqa: E402
from cxr_core.models.manifest import read_manifest  # noqa: E402
from cxr_core.training import trainer  # noqa: E402
from cxr_core.training.mixstyle import restyle  # noqa: E402

log = logging.getLogger("train_fixed_statistics")


def fix_statistics(network: torch.nn.Module, layers: tuple[str, ...], reference: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Permanent hooks: each layer's output (N, C, H, W) takes the reference's (1, C, 1, 1) mean and spread."""
    for path, (mean, spread) in zip(layers, reference):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor, mean=mean, spread=spread) -> torch.Tensor:
            return restyle(output, mean, spread)
        network.get_submodule(path).register_forward_hook(hook)


def reference_from(init_model: str, size: int, bank: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model = load_model(resolve_model(init_model).path)
    model = replace(model, manifest=replace(model.manifest, input=replace(model.manifest.input, size=(size, size))))
    t = Transplant(model)
    with t.hooked():
        stats = _bank(t, [r for r in _records(bank) if r.label == "normal"], seed=0)
    return [(mu.mean(0, keepdim=True), sigma.mean(0, keepdim=True)) for mu, sigma in stats]


def score(out: Path, layers: tuple[str, ...]) -> dict:
    folder = next(p for p in out.iterdir() if (p / "manifest.json").is_file())
    ref = load_file(str(out / "reference.safetensors"))
    reference = [(ref[f"{i}.mean"], ref[f"{i}.spread"]) for i in range(len(layers))]
    model = load_model(folder, device="cpu")
    fix_statistics(model.network, layers, reference)
    manifest = read_manifest(folder)
    result: dict[str, object] = {"model": manifest.key, "threshold": manifest.thresholds, "temperature": manifest.temperature,
                                 "val_accuracy": ((manifest.metrics or {}).get("val") or {}).get("accuracy")}
    for name, spec in (("openist", "../shared/data/cxr-extra::openist"), ("nih_pneumonia_val", "../shared/data/cxr-extra:val:nih_pneumonia")):
        records = _records(spec)
        called = 0
        for _, x in _read_batches(records, manifest.input):
            probs = logits_to_probabilities(predict_logits(model, x), manifest)
            called += sum(decide(row, manifest) == manifest.classes[0] for row in probs)
        result[name] = {"called_covid": int(called), "n": len(records)}
        log.info("%s: %d of %d called COVID-19", name, called, len(records))
    (out / "score.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the reference and the score go (the train --out is inside)")
    parser.add_argument("--init-model", default="densenet121-covid3@1.3.1")
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--bank", default="../shared/data/cxr:train")
    parser.add_argument("--score-only", action="store_true")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    layers = trainer.mix_style_layers(trainer.TrainConfig(data_dir="-", arch="densenet121", out="-", model_id="-", mix_style=1.0))
    if not args.score_only:
        args.out.mkdir(parents=True, exist_ok=True)
        reference = reference_from(args.init_model, args.size, args.bank)
        save_file({f"{i}.{k}": t.contiguous() for i, (mu, s) in enumerate(reference) for k, t in (("mean", mu), ("spread", s))},
                  str(args.out / "reference.safetensors"))
        log.info("reference recorded: %s", ", ".join(f"{p} {tuple(mu.shape)}" for p, (mu, _) in zip(layers, reference)))
        build = trainer.build_network

        def hooked_build(arch: str, n_outputs: int, in_channels: int = 3):  # type: ignore[no-untyped-def]
            network = build(arch, n_outputs, in_channels)
            fix_statistics(network, layers, reference)
            return network
        trainer.build_network = hooked_build  # every network the run builds, export and calibration included
        from cxr_core.cli import main as cli_main

        rest = [a for a in args.train_args if a != "--"]
        code = cli_main(["-v", "train", *rest])
        if code:
            raise SystemExit(code)
    score(args.out, layers)


if __name__ == "__main__":
    main()
