"""Test-time feature statistics of the training normals (docs/experiments/2026-12-06-normal-style-reference.md;
the rule there was written before this ran).

    python scripts/style_reference_eval.py score --model densenet121-covid3@1.3.1 --out var/probe/style-ref \
        val=../shared/data/cxr:val openist=../shared/data/cxr-extra::openist nih=../shared/data/cxr-extra::nih_pneumonia
    python scripts/style_reference_eval.py rule --model densenet121-covid3@1.3.1 --out var/probe/style-ref [--json OUT]
    python scripts/style_reference_eval.py final --candidate N1 ... test=../shared/data/cxr:test jsrt=../shared/data/cxr-external/jsrt

``score`` writes, per named set, the logits of every candidate (T: the plain network; N1, N4, Nm,
NA1: the outputs of the MixStyle layers given a reference's channel mean and spread) to
``OUT/<name>.npz``. ``rule`` refits temperature and threshold on ``val`` only and applies the
rule; ``final`` reports one chosen candidate on further sets (the test split, JSRT), after the
choice. Nothing but temperature and threshold is fitted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cxr_core.imaging.io import read_image  # noqa: E402
from cxr_core.imaging.preprocess import to_batch  # noqa: E402
from cxr_core.inference import predict_logits  # noqa: E402
from cxr_core.metrics import expected_calibration_error  # noqa: E402
from cxr_core.models.loading import LoadedModel, load_model, resolve_model  # noqa: E402
from cxr_core.training.calibration import choose_threshold, fit_temperature  # noqa: E402
from cxr_core.training.config import TrainConfig  # noqa: E402
from cxr_core.training.dataset import Record, scan_folder  # noqa: E402
from cxr_core.training.mixstyle import channel_statistics, restyle  # noqa: E402
from cxr_core.training.trainer import mix_style_layers, probabilities  # noqa: E402

log = logging.getLogger("style_reference_eval")
CANDIDATES = ("T", "N1", "N4", "Nm", "NA1")
BANK = 256
SENSITIVITY = 0.95
Stats = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (N, C, 1, 1) means and spreads


def _records(spec: str) -> list[Record]:
    """FOLDER[:SPLIT[:SOURCE]] -> its records."""
    folder, _, rest = spec.partition(":")
    split, _, source = rest.partition(":")
    return [r for r in scan_folder(Path(folder)) if (not split or r.split == split) and (not source or r.source == source)]


class Transplant:
    """Forward hooks on the MixStyle layers that record their channel statistics or replace them."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.layers = mix_style_layers(TrainConfig(data_dir="-", arch=model.manifest.architecture, out="-", model_id="-", mix_style=1.0))
        self.recorded: Stats | None = None
        self.reference: Stats | None = None

    def _hook(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        if self.recorded is not None:
            self.recorded.append(channel_statistics(output))
            return None
        if self.reference is not None:
            mean, spread = self.reference[len(self._applied)]
            self._applied.append(True)
            return restyle(output, mean, spread)
        return None

    @contextmanager
    def hooked(self) -> Iterator["Transplant"]:
        handles = [self.model.network.get_submodule(p).register_forward_hook(self._hook) for p in self.layers]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def record(self, batch: torch.Tensor) -> Stats:
        self.recorded, self.reference = [], None
        predict_logits(self.model, batch)
        out, self.recorded = self.recorded, None
        return out

    def logits(self, batch: torch.Tensor, reference: Stats | None) -> np.ndarray:
        """(N, 3, H, W) -> (N, K) logits, with each layer's statistics taken from ``reference`` (None: plain)."""
        self.recorded, self.reference, self._applied = None, reference, []
        try:
            return predict_logits(self.model, batch).float().numpy()
        finally:
            self.reference = None


def _read_batches(records: list[Record], spec, size: int = 32) -> Iterator[tuple[list[Record], torch.Tensor]]:
    def read(r: Record):  # type: ignore[no-untyped-def]
        try:
            return read_image(r.path).pixels
        except Exception as exc:  # noqa: BLE001 - a probe logs and skips unreadable films
            log.warning("unreadable %s: %s", r.path.name, exc)
            return None
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(records), size):
            chunk = records[start : start + size]
            pairs = [(r, px) for r, px in zip(chunk, pool.map(read, chunk)) if px is not None]
            yield [r for r, _ in pairs], to_batch([px for _, px in pairs], spec)


def _bank(t: Transplant, records: list[Record], seed: int) -> Stats:
    rng = np.random.default_rng(seed)
    chosen = [records[i] for i in sorted(rng.choice(len(records), size=min(BANK, len(records)), replace=False))]
    parts: list[Stats] = [t.record(x) for _, x in _read_batches(chosen, t.model.manifest.input)]
    return [(torch.cat([p[k][0] for p in parts]), torch.cat([p[k][1] for p in parts])) for k in range(len(t.layers))]


def _pick(bank: Stats, index: np.ndarray) -> Stats:
    return [(mu[index], sigma[index]) for mu, sigma in bank]


def score(args: argparse.Namespace) -> None:
    model = load_model(resolve_model(args.model).path)
    args.out.mkdir(parents=True, exist_ok=True)
    t = Transplant(model)
    with t.hooked():
        train_normals = [r for r in _records(args.bank) if r.label == "normal"]
        bank = _bank(t, train_normals, seed=0)
        adults = _bank(t, [r for r in train_normals if r.source == "c19rdb"], seed=1)
        mean = [(mu.mean(0, keepdim=True), sigma.mean(0, keepdim=True)) for mu, sigma in bank]
        for item in args.sets:
            name, _, spec = item.partition("=")
            records = _records(spec)
            rng = np.random.default_rng(0)
            draws = rng.integers(0, BANK, size=(len(records), 4))
            adult_draws = rng.integers(0, BANK, size=len(records))
            out: dict[str, list[np.ndarray]] = {c: [] for c in ("T", "N1", "N4", "Nm", "NA1")}
            meta: dict[str, list[str]] = {"path": [], "label": [], "source": [], "split": []}
            started, done = time.monotonic(), 0
            for kept, x in _read_batches(records, model.manifest.input):
                at = np.arange(done, done + len(kept))  # donors follow the order of the films read
                out["T"].append(t.logits(x, None))
                four = [t.logits(x, _pick(bank, draws[at, k])) for k in range(4)]
                out["N1"].append(four[0])
                out["N4"].append(np.stack(four, axis=1))  # (N, 4, K)
                out["Nm"].append(t.logits(x, mean))  # (1, C, 1, 1): every film the same
                out["NA1"].append(t.logits(x, _pick(adults, adult_draws[at])))
                for r in kept:
                    for key, value in (("path", str(r.path)), ("label", r.label), ("source", r.source or ""), ("split", r.split)):
                        meta[key].append(value)
                done += len(kept)
                log.info("%s: %d of %d films, %.1f films/s", name, done, len(records), done / (time.monotonic() - started))
            np.savez(args.out / f"{name}.npz", **{k: np.concatenate(v) for k, v in out.items()}, **{k: np.array(v) for k, v in meta.items()})


def _probabilities(logits: np.ndarray, kind: str, temperature: float) -> np.ndarray:
    """(N, K) or (N, D, K) logits -> (N, classes) probabilities, the mean over donors D."""
    if logits.ndim == 3:
        return np.mean([probabilities(logits[:, d], kind, temperature) for d in range(logits.shape[1])], axis=0)
    return probabilities(logits, kind, temperature)


def _calibrated(candidate: str, val: dict, classes: list[str], kind: str) -> tuple[float, float]:
    """Temperature and COVID-19 threshold of ``candidate`` on the validation films of the model's classes."""
    logits = val[candidate]
    known = np.isin(val["label"], classes)
    labels = np.array([classes.index(c) if c in classes else -1 for c in val["label"]])
    fit = logits[known]
    y = labels[known]
    if fit.ndim == 3:  # every donor's logits as a sample of its film
        y = np.repeat(y, fit.shape[1])
        fit = fit.reshape(-1, fit.shape[-1])
    temperature = fit_temperature(fit, y, kind)
    p = _probabilities(logits, kind, temperature)
    threshold = choose_threshold(p[:, 0], val["label"] == classes[0], SENSITIVITY)
    return temperature, threshold


def _decide(p: np.ndarray, threshold: float) -> np.ndarray:
    """The app's rule (cxr_core.inference.decide) for a thresholded first class."""
    return np.where(p[:, 0] >= threshold, 0, 1 + np.argmax(p[:, 1:], axis=1))


def rule(args: argparse.Namespace) -> None:
    manifest = load_model(resolve_model(args.model).path).manifest
    classes, kind = list(manifest.classes), manifest.head
    sets = {p.stem: dict(np.load(p)) for p in sorted(args.out.glob("*.npz"))}
    val = sets["val"]
    known = np.isin(val["label"], classes)
    labels = np.array([classes.index(c) if c in classes else -1 for c in val["label"]])
    val_normals = val["label"] == "normal"
    results = {}
    for c in CANDIDATES:
        temperature, threshold = (manifest.temperature, manifest.thresholds[classes[0]]) if c == "T" else _calibrated(c, val, classes, kind)
        pv = _probabilities(val[c], kind, temperature)
        decided = _decide(pv, threshold)
        r = {"temperature": round(temperature, 4), "threshold": round(threshold, 4),
             "val_accuracy": round(float(np.mean(decided[known] == labels[known])), 4),
             "val_sensitivity": round(float(np.mean(pv[val["label"] == "covid", 0] >= threshold)), 4),
             "val_normals_called_covid": int(np.sum(pv[val_normals, 0] >= threshold))}
        for name in ("openist", "nih"):
            r[name] = int(np.sum(_probabilities(sets[name][c], kind, temperature)[:, 0] >= threshold))
        r["primary"] = r["openist"] + r["nih"]
        results[c] = r
        print(f"{c:>4}: primary {r['primary']:4d} (openist {r['openist']}, nih_pneumonia {r['nih']}); val acc {r['val_accuracy']:.4f}, "
              f"val sens {r['val_sensitivity']:.3f}, val normals called COVID-19 {r['val_normals_called_covid']}, "
              f"T {temperature:.3f}, threshold {threshold:.3f}", flush=True)
    base = results["T"]
    verdicts = {}
    for c in CANDIDATES[1:]:
        r = results[c]
        conditions = {"1: primary at most 0.8 x T's": r["primary"] <= 0.8 * base["primary"],
                      "2: val accuracy within 0.02 of T's": r["val_accuracy"] >= base["val_accuracy"] - 0.02,
                      "3: val normals called COVID-19 at most T's + 10%": r["val_normals_called_covid"] <= base["val_normals_called_covid"] * 1.1}
        verdicts[c] = {"conditions": conditions, "passes": all(conditions.values())}
        print(f"  {c}: " + "; ".join(f"{k.split(':')[0]} {'ok' if ok else 'FAILS'}" for k, ok in conditions.items()))
    passing = [c for c, v in verdicts.items() if v["passes"]]
    chosen = min(passing, key=lambda c: results[c]["primary"]) if passing else None
    print(f"chosen by the rule: {chosen or 'none (nothing changes)'}")
    if args.json:
        args.json.write_text(json.dumps({"model": manifest.key, "results": results, "verdicts": verdicts, "chosen": chosen},
                                        indent=2, default=bool) + "\n")


def final(args: argparse.Namespace) -> None:
    manifest = load_model(resolve_model(args.model).path).manifest
    classes, kind = list(manifest.classes), manifest.head
    val = dict(np.load(args.out / "val.npz"))
    for c in ("T", args.candidate):
        temperature, threshold = (manifest.temperature, manifest.thresholds[classes[0]]) if c == "T" else _calibrated(c, val, classes, kind)
        for name in args.names:
            s = dict(np.load(args.out / f"{name}.npz"))
            p = _probabilities(s[c], kind, temperature)
            covid = s["label"] == "covid"
            line = f"{c:>4} {name}: {int(np.sum(p[:, 0] >= threshold))} of {len(p)} called COVID-19"
            if covid.any():
                known = np.isin(s["label"], classes)
                labels = np.array([classes.index(x) if x in classes else -1 for x in s["label"]])
                ece = expected_calibration_error(p[known], labels[known])
                line += f"; COVID-19 sensitivity {np.mean(p[covid, 0] >= threshold):.4f}, ECE {ece:.4f}"
            print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("score", "rule", "final"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--out", type=Path, required=True)
        if name == "score":
            p.add_argument("sets", nargs="+", metavar="NAME=FOLDER[:SPLIT[:SOURCE]]")
            p.add_argument("--bank", default="../shared/data/cxr:train", metavar="FOLDER[:SPLIT]")
        if name == "rule":
            p.add_argument("--json", type=Path)
        if name == "final":
            p.add_argument("--candidate", required=True, choices=CANDIDATES[1:])
            p.add_argument("names", nargs="+")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    {"score": score, "rule": rule, "final": final}[args.command](args)


if __name__ == "__main__":
    main()
