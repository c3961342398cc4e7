// PNG info: drop any image (ours or AUTOMATIC1111's), read its generation parameters, send them (and the picture)
// to a mode of the Generate view.
import * as api from "./api.js";
import { $, clearErrors, el, showError } from "./dom.js";

export class PngInfo {
  constructor(studio, showView) {
    this.studio = studio;
    this.showView = showView;
    this.fields = null;
    const zone = $("#png-drop"), file = $("#png-file");
    $("#png-browse").addEventListener("click", () => file.click());
    file.addEventListener("change", () => file.files[0] && this.read(file.files[0]));
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      if (e.dataTransfer.files[0]) this.read(e.dataTransfer.files[0]);
    });
    for (const button of document.querySelectorAll("#png-send button")) {
      button.addEventListener("click", () => this.send(button.dataset.send));
    }
    this.image = null;
  }

  async read(file) {
    const view = $("#view-pnginfo");
    clearErrors(view);
    const image = await api.fileToBase64(file);
    $("#png-image").src = api.pngUrl(image);
    $("#png-image").hidden = false;
    this.enable([]);
    try {
      const info = await api.post("/api/v1/png-info", { image });
      this.image = image;
      this.fields = info.fields;
      $("#png-text").textContent = info.infotext || "This image carries no generation parameters.";
      $("#png-fields").replaceChildren(...Object.entries(info.fields).filter(([k, v]) => shown(k, v))
        .map(([k, v]) => el("tr", {}, el("td", {}, label(k)), el("td", {}, text(v)))));
      const known = Object.keys(info.fields).length > 0;
      this.enable(known ? ["txt2img", "img2img", "inpaint", "upscale"] : ["img2img", "inpaint", "upscale"]);
    } catch (e) {
      this.fields = null;
      $("#png-image").hidden = true;
      const message = e.field === "image" ? `${file.name} is not a picture sdstudio can read: drop a PNG, JPEG or WebP`
        : e.message;
      showError(view, e.field || "image", message, null);
    }
  }

  enable(modes) {
    for (const button of document.querySelectorAll("#png-send button")) button.disabled = !modes.includes(button.dataset.send);
  }

  // The parameters into the form, and for img2img, inpaint and extras the picture itself.
  async send(mode) {
    if (this.fields && mode !== "upscale") await this.studio.load(this.fields);
    if (mode !== "txt2img" && this.image) await this.studio.setImage(this.image);
    this.studio.setMode(mode);
    this.showView("generate");
  }
}

// What the table leaves out: empty and default values, and fields of other model families.
const HIDDEN = new Set(["original_size", "crop_left_top", "aesthetic_score", "negative_aesthetic_score", "capture_every",
  "init_latents", "denoising_start", "denoising_end", "controlnets", "mode"]);

function shown(key, value) {
  if (HIDDEN.has(key) || value === null || value === "" || value === false) return false;
  return !(Array.isArray(value) && (value.length === 0 || value.every((v) => v === 0)));
}

const label = (key) => key.replaceAll("_", " ").replace(/^./, (c) => c.toUpperCase());
const text = (value) => (typeof value === "object" ? JSON.stringify(value) : String(value));
