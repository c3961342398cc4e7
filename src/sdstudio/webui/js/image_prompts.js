// IP-Adapter units (image prompts): an adapter, 1-4 pictures, weight and start/end, optionally the image encoder.
import * as api from "./api.js";
import { el, fillSelect, UnitList } from "./dom.js";

export function imagePrompts(container, countBadge, catalog) {
  return new UnitList(container, countBadge, (values, onRemove) => new ImagePrompt(catalog, values, onRemove));
}

class ImagePrompt {
  constructor(catalog, values, onRemove) {
    this.images = values.images || [];  // base64 PNGs
    this.model = el("select", { "data-field": "model" });
    fillSelect(this.model, catalog.ip_adapters.length ? catalog.ip_adapters : [""], values.model);
    this.encoder = el("select", { title: "The CLIP image encoder; auto: the first whose widths fit the adapter" });
    fillSelect(this.encoder, ["", ...catalog.image_encoders], values.encoder || "");
    this.encoder.options[0].textContent = "auto";
    this.weight = el("input", { type: "number", step: "0.05", min: 0, max: 2, value: values.weight ?? 1 });
    this.start = el("input", { type: "number", step: "0.05", min: 0, max: 1, value: values.start ?? 0 });
    this.end = el("input", { type: "number", step: "0.05", min: 0, max: 1, value: values.end ?? 1 });
    this.file = el("input", { type: "file", accept: "image/*", multiple: true, hidden: true,
      onchange: () => this.upload() });
    this.thumbs = el("div", { class: "thumbs" });
    const field = (label, input) => el("div", { class: "field" }, el("label", {}, label), input);
    this.node = el("div", { class: "unit ip-unit" },
      el("div", { class: "row" }, field("IP-Adapter", this.model), field("Image encoder", this.encoder)),
      el("div", { class: "row" }, field("Weight", this.weight), field("Start", this.start), field("End", this.end)),
      el("div", { class: "actions" },
        el("button", { type: "button", onclick: () => this.file.click() }, "Upload images"),
        el("button", { type: "button", onclick: onRemove }, "Remove"), this.file),
      this.thumbs);
    this.show();
  }

  async upload() {
    const files = [...this.file.files].slice(0, 4);
    if (!files.length) return;
    this.images = await Promise.all(files.map((f) => api.fileToBase64(f)));
    this.show();
  }

  show() {
    this.thumbs.replaceChildren(...this.images.map((b64) => el("img", { alt: "image prompt", src: api.pngUrl(b64) })));
  }

  toRequest() {
    return {
      model: this.model.value, images: this.images, encoder: this.encoder.value,
      weight: Number(this.weight.value), start: Number(this.start.value), end: Number(this.end.value),
    };
  }
}
