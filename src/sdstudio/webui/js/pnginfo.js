// PNG info: drop any image (ours or AUTOMATIC1111's), read its generation parameters, load them into the form.
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
    $("#png-load").addEventListener("click", () => this.load());
  }

  async read(file) {
    const view = $("#view-pnginfo");
    clearErrors(view);
    const image = await api.fileToBase64(file);
    $("#png-image").src = api.pngUrl(image);
    $("#png-image").hidden = false;
    try {
      const info = await api.post("/api/v1/png-info", { image });
      this.fields = info.fields;
      $("#png-text").textContent = info.infotext || "This image carries no generation parameters.";
      $("#png-fields").replaceChildren(...Object.entries(info.fields)
        .map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, typeof v === "object" ? JSON.stringify(v) : String(v)))));
      $("#png-load").disabled = !Object.keys(info.fields).length;
    } catch (e) {
      this.fields = null;
      $("#png-load").disabled = true;
      showError(view, e.field || "image", e.message, null);
    }
  }

  async load() {
    if (!this.fields) return;
    await this.studio.load(this.fields);
    this.showView("generate");
  }
}
