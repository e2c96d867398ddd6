"""The film viewer of the Diagnose page: window/level by dragging, zoom by the wheel, pan, reset.

Two canvases side by side, the film and the film with its heatmap, share one view: a
radiologist windows and zooms the film and the Grad-CAM overlay follows. Written as one
self-contained HTML document (no network, no external script) that the page embeds; the
browser does the windowing, so dragging costs no round trip to the server.

Controls follow PACS habits: left-drag windows (right/left: width, up/down: level), the
wheel zooms about the cursor, shift-drag (or the middle button) pans, double-click or
"Reset" returns to the whole film as read.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
from PIL import Image

#: window presets on the display scale (0 = black, 1 = white), as (level, width)
PRESETS: dict[str, tuple[float, float]] = {"As read": (0.5, 1.0), "Lungs": (0.35, 0.6), "Mediastinum": (0.6, 0.5), "Bone": (0.7, 0.45)}


def _png(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def heat_layer(colours: np.ndarray, heatmap: np.ndarray, opacity: float, threshold: float = 0.0) -> np.ndarray:
    """(H, W, 4) uint8 RGBA layer for the viewer: ``colours`` (H, W, 3) uint8 from the colormap,
    alpha ``opacity`` where ``heatmap`` (H, W) in [0, 1] reaches ``threshold``, else clear."""
    alpha = np.full(heatmap.shape, round(255 * opacity), np.uint8)
    alpha[heatmap < threshold] = 0
    return np.dstack([colours, alpha])


def viewer_html(
    film: np.ndarray,
    heat: np.ndarray | None,
    *,
    marks: np.ndarray | None = None,
    height: int = 560,
) -> str:
    """A document showing ``film`` ((H, W) uint8, display polarity) and, beside it, the same
    film under ``heat`` ((H, W, 4) uint8 RGBA, the film's shape) in one shared view; ``marks``
    ((H, W, 4) RGBA, e.g. outlined text regions) are drawn over the film pane only."""
    for name, layer in (("heat", heat), ("marks", marks)):
        if layer is not None and (layer.shape[:2] != film.shape or layer.ndim != 3 or layer.shape[2] != 4):
            raise ValueError(f"{name} layer {layer.shape} does not match the film {film.shape} as (H, W, 4)")
    data = {"film": _png(film), "heat": _png(heat) if heat is not None else None, "marks": _png(marks) if marks is not None else None,
            "presets": PRESETS}
    return _TEMPLATE.replace("__DATA__", json.dumps(data)).replace("__HEIGHT__", str(int(height)))


_TEMPLATE = """<!doctype html>
<html><head><meta charset="utf-8"><style>
body { margin: 0; font: 13px sans-serif; color: #31333f; }
#panes { display: flex; gap: 8px; }
.pane { flex: 1; min-width: 0; }
canvas { width: 100%; height: __HEIGHT__px; background: #000; cursor: crosshair; display: block; touch-action: none; }
.cap { margin: 2px 0 6px; color: #555; }
#bar { display: flex; gap: 8px; align-items: center; flex-wrap: wrap; margin-top: 4px; }
button { font: inherit; padding: 2px 8px; }
#wl { font-variant-numeric: tabular-nums; }
</style></head><body>
<div id="panes"></div>
<div id="bar"><span id="wl" data-testid="viewer-state"></span><span id="presets"></span><button id="reset">Reset</button>
<span class="cap">Drag: window (left/right width, up/down level) · wheel: zoom · shift-drag: pan · double-click: reset</span></div>
<script>
const D = __DATA__;
const panes = document.getElementById("panes");
const canvases = [];
for (const [i, src] of [D.film, D.heat].entries()) {
  if (i === 1 && !src) break;
  const pane = document.createElement("div"); pane.className = "pane";
  const c = document.createElement("canvas"); c.dataset.role = i ? "overlay" : "film";
  pane.append(c); panes.append(pane); canvases.push(c);
}
const load = (b64) => new Promise((ok) => { const im = new Image(); im.onload = () => ok(im); im.src = "data:image/png;base64," + b64; });
let grey = null, W = 0, H = 0, heat = null, marks = null, windowed = document.createElement("canvas");
const view = { level: 0.5, width: 1.0, zoom: 1.0, cx: 0.5, cy: 0.5 };
function reset() { Object.assign(view, { level: 0.5, width: 1.0, zoom: 1.0, cx: 0.5, cy: 0.5 }); paintFilm(); draw(); }
function paintFilm() {
  // Window on the display scale: level +/- width/2 maps to black..white, through a 256-entry table.
  const lut = new Uint8ClampedArray(256), lo = view.level - view.width / 2;
  for (let v = 0; v < 256; v++) lut[v] = Math.round(255 * Math.min(1, Math.max(0, (v / 255 - lo) / view.width)));
  const ctx = windowed.getContext("2d"), out = ctx.createImageData(W, H);
  for (let p = 0, q = 0; p < grey.length; p++, q += 4) { const g = lut[grey[p]]; out.data[q] = out.data[q + 1] = out.data[q + 2] = g; out.data[q + 3] = 255; }
  ctx.putImageData(out, 0, 0);
}
function draw() {
  for (const c of canvases) {
    const r = c.getBoundingClientRect(), dpr = window.devicePixelRatio || 1;
    c.width = Math.max(1, Math.round(r.width * dpr)); c.height = Math.max(1, Math.round(r.height * dpr));
    const ctx = c.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0); ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height);
    const fit = Math.min(c.width / W, c.height / H) * view.zoom;
    ctx.setTransform(fit, 0, 0, fit, c.width / 2 - view.cx * W * fit, c.height / 2 - view.cy * H * fit);
    ctx.imageSmoothingEnabled = view.zoom < 2;
    ctx.drawImage(windowed, 0, 0);
    if (c.dataset.role === "overlay" && heat) ctx.drawImage(heat, 0, 0);
    if (c.dataset.role === "film" && marks) ctx.drawImage(marks, 0, 0);
  }
  document.getElementById("wl").textContent =
    `Window: level ${view.level.toFixed(2)}, width ${view.width.toFixed(2)} · zoom ${view.zoom.toFixed(1)}x`;
}
function attach(c) {
  let last = null;
  c.addEventListener("pointerdown", (e) => { last = { x: e.clientX, y: e.clientY, pan: e.shiftKey || e.button === 1 }; c.setPointerCapture(e.pointerId); });
  c.addEventListener("pointermove", (e) => {
    if (!last) return;
    const r = c.getBoundingClientRect(), dx = (e.clientX - last.x) / r.width, dy = (e.clientY - last.y) / r.height;
    if (last.pan) {
      const fit = Math.min(r.width / W, r.height / H) * view.zoom;
      view.cx -= (e.clientX - last.x) / (fit * W); view.cy -= (e.clientY - last.y) / (fit * H);
    } else {
      view.width = Math.min(2, Math.max(0.02, view.width + dx)); view.level = Math.min(1, Math.max(0, view.level - dy));
      paintFilm();
    }
    last = { x: e.clientX, y: e.clientY, pan: last.pan }; draw();
  });
  c.addEventListener("pointerup", () => { last = null; });
  c.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = c.getBoundingClientRect(), before = Math.min(r.width / W, r.height / H) * view.zoom;
    // Zoom about the cursor: the film point under it stays under it.
    const fx = view.cx + (e.clientX - r.left - r.width / 2) / (before * W), fy = view.cy + (e.clientY - r.top - r.height / 2) / (before * H);
    view.zoom = Math.min(16, Math.max(1, view.zoom * Math.exp(-e.deltaY / 500)));
    const after = Math.min(r.width / W, r.height / H) * view.zoom;
    view.cx = fx - (e.clientX - r.left - r.width / 2) / (after * W); view.cy = fy - (e.clientY - r.top - r.height / 2) / (after * H);
    draw();
  }, { passive: false });
  c.addEventListener("dblclick", reset);
}
(async () => {
  const film = await load(D.film);
  W = film.width; H = film.height; windowed.width = W; windowed.height = H;
  const scratch = document.createElement("canvas"); scratch.width = W; scratch.height = H;
  const sctx = scratch.getContext("2d"); sctx.drawImage(film, 0, 0);
  const rgba = sctx.getImageData(0, 0, W, H).data; grey = new Uint8Array(W * H);
  for (let p = 0; p < grey.length; p++) grey[p] = rgba[4 * p];
  if (D.heat) heat = await load(D.heat);
  if (D.marks) marks = await load(D.marks);
  for (const [name, [level, width]] of Object.entries(D.presets)) {
    const b = document.createElement("button"); b.textContent = name;
    b.onclick = () => { view.level = level; view.width = width; paintFilm(); draw(); };
    document.getElementById("presets").append(b);
  }
  document.getElementById("reset").onclick = reset;
  canvases.forEach(attach); paintFilm(); draw();
  window.addEventListener("resize", draw);
  document.body.dataset.ready = "1";
})();
</script></body></html>
"""
