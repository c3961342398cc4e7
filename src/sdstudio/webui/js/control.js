// ControlNet units: model, preprocessor, weight, start/end, mode; a control image uploaded or drawn,
// and the preprocessor's output shown before generating (POST /api/v1/preprocess).
import * as api from "./api.js";
import { el, fillSelect, UnitList } from "./dom.js";

const RESIZE_MODES = ["just resize", "crop", "fill"];

export function controlUnits(container, countBadge, catalog) {
  return new UnitList(container, countBadge, (values, onRemove) => new Unit(catalog, values, onRemove));
}

class Unit {
  constructor(catalog, values, onRemove) {
    this.image = values.image || null;  // base64 PNG, or null: the init image is used
    const models = catalog.controlnets.length ? catalog.controlnets : [""];
    this.model = el("select", { "data-field": "model" });
    fillSelect(this.model, models, values.model);
    this.pre = el("select");
    fillSelect(this.pre, catalog.preprocessors, values.preprocessor || "none");
    this.weight = el("input", { type: "number", step: "0.05", value: values.weight ?? 1 });
    this.start = el("input", { type: "number", step: "0.05", min: 0, max: 1, value: values.start ?? 0 });
    this.end = el("input", { type: "number", step: "0.05", min: 0, max: 1, value: values.end ?? 1 });
    this.guess = el("input", { type: "checkbox", checked: !!values.guess_mode });
    this.resize = el("select");
    fillSelect(this.resize, RESIZE_MODES, values.resize_mode || "just resize");
    this.low = el("input", { type: "number", min: 0, max: 255, value: values.low_threshold ?? 100 });
    this.high = el("input", { type: "number", min: 0, max: 255, value: values.high_threshold ?? 200 });
    this.file = el("input", { type: "file", accept: "image/*", hidden: true, onchange: () => this.upload() });
    this.shown = el("img", { alt: "control image", hidden: !this.image, src: this.image ? api.pngUrl(this.image) : null });
    this.processed = el("img", { alt: "preprocessor output", hidden: true });
    this.canvas = el("canvas", { class: "draw", width: 256, height: 256, hidden: true });
    this.error = el("p", { class: "field-error", hidden: true });
    const field = (label, input) => el("div", { class: "field" }, el("label", {}, label), input);
    this.node = el("div", { class: "unit" },
      el("div", { class: "row" }, field("ControlNet model", this.model), field("Preprocessor", this.pre)),
      el("div", { class: "row" }, field("Weight", this.weight), field("Start", this.start), field("End", this.end),
        field("Resize", this.resize)),
      el("div", { class: "row" }, field("Canny low", this.low), field("Canny high", this.high),
        el("label", { class: "check" }, this.guess, " ControlNet is more important")),
      el("div", { class: "actions" },
        el("button", { type: "button", onclick: () => this.file.click() }, "Upload image"),
        el("button", { type: "button", onclick: () => this.startDrawing() }, "Draw"),
        el("button", { type: "button", onclick: () => this.preview() }, "Preview preprocessor"),
        el("button", { type: "button", onclick: onRemove }, "Remove"), this.file),
      el("div", { class: "thumbs" }, this.shown, this.canvas, this.processed), this.error);
    this.drawing = null;
  }

  async upload() {
    const file = this.file.files[0];
    if (!file) return;
    this.image = await api.fileToBase64(file);
    this.canvas.hidden = true;
    this.shown.src = api.pngUrl(this.image);
    this.shown.hidden = false;
  }

  // Draw white lines on black, the convention of edge and scribble control images.
  startDrawing() {
    const c = this.canvas.getContext("2d");
    c.fillStyle = "#000";
    c.fillRect(0, 0, this.canvas.width, this.canvas.height);
    this.canvas.hidden = false;
    this.shown.hidden = true;
    this.image = api.canvasToBase64(this.canvas);
    let last = null;
    const at = (e) => {
      const box = this.canvas.getBoundingClientRect();
      return [(e.clientX - box.left) * this.canvas.width / box.width, (e.clientY - box.top) * this.canvas.height / box.height];
    };
    if (this.drawing) return;
    this.drawing = true;
    this.canvas.addEventListener("pointerdown", (e) => { last = at(e); this.canvas.setPointerCapture(e.pointerId); });
    this.canvas.addEventListener("pointermove", (e) => {
      if (!last) return;
      const next = at(e);
      Object.assign(c, { strokeStyle: "#fff", lineWidth: 3, lineCap: "round" });
      c.beginPath(); c.moveTo(...last); c.lineTo(...next); c.stroke();
      last = next;
    });
    this.canvas.addEventListener("pointerup", () => { last = null; this.image = api.canvasToBase64(this.canvas); });
  }

  async preview() {
    this.error.hidden = true;
    if (!this.image) {
      this.error.textContent = "upload or draw a control image first (without one, the init image is used)";
      this.error.hidden = false;
      return;
    }
    try {
      const out = await api.post("/api/v1/preprocess", {
        image: this.image, preprocessor: this.pre.value,
        low_threshold: Number(this.low.value), high_threshold: Number(this.high.value),
      });
      this.processed.src = api.pngUrl(out.image);
      this.processed.hidden = false;
    } catch (e) {
      this.error.textContent = e.message;
      this.error.hidden = false;
    }
  }

  toRequest() {
    return {
      model: this.model.value, image: this.image, preprocessor: this.pre.value,
      weight: Number(this.weight.value), start: Number(this.start.value), end: Number(this.end.value),
      guess_mode: this.guess.checked, resize_mode: this.resize.value,
      low_threshold: Number(this.low.value), high_threshold: Number(this.high.value),
    };
  }
}

