// Settings: the server's defaults (through A1111's /sdapi/v1/options, which every client shares) and this
// browser's own preferences (localStorage).
import * as api from "./api.js";
import { $, clearErrors, fillSelect, showError } from "./dom.js";

const KEY = "sdstudio.prefs";

export function loadPrefs() {
  const prefs = { preview: true, light: false };
  try {
    Object.assign(prefs, JSON.parse(localStorage.getItem(KEY) || "{}"));
  } catch { /* a damaged entry: the defaults */ }
  document.documentElement.classList.toggle("light", !!prefs.light);
  return prefs;
}

export class Settings {
  constructor(prefs, catalog) {
    this.prefs = prefs;
    this.catalog = catalog;
    $("#settings-form").addEventListener("submit", (e) => { e.preventDefault(); this.save(); });
    // this browser's preferences apply and are kept at once; the server's defaults wait for Save
    for (const id of ["#set-preview", "#set-light"]) $(id).addEventListener("change", () => this.keepPrefs());
    for (const id of ["#set-model", "#set-vae", "#set-clip"]) {
      $(id).addEventListener("change", () => { $("#settings-saved").textContent = "unsaved changes"; });
    }
  }

  keepPrefs() {
    this.prefs.preview = $("#set-preview").checked;
    this.prefs.light = $("#set-light").checked;
    try { localStorage.setItem(KEY, JSON.stringify(this.prefs)); } catch { /* not kept */ }
    document.documentElement.classList.toggle("light", this.prefs.light);
  }

  async refresh() {
    const options = await api.get("/sdapi/v1/options");
    const titles = (await api.get("/sdapi/v1/sd-models")).map((m) => m.title);
    fillSelect($("#set-model"), titles, options.sd_model_checkpoint);
    fillSelect($("#set-vae"), ["Automatic", "None", ...this.catalog.vaes], options.sd_vae);
    $("#set-clip").value = options.CLIP_stop_at_last_layers;
    $("#set-preview").checked = this.prefs.preview;
    $("#set-light").checked = this.prefs.light;
  }

  async save() {
    const form = $("#settings-form");
    clearErrors(form);
    this.keepPrefs();
    try {
      await api.post("/sdapi/v1/options", { sd_model_checkpoint: $("#set-model").value, sd_vae: $("#set-vae").value,
        CLIP_stop_at_last_layers: Number($("#set-clip").value) });
      $("#settings-saved").textContent = "saved";
      setTimeout(() => { $("#settings-saved").textContent = ""; }, 2000);
    } catch (e) {
      showError(form, e.field, e.message, $('[data-error-for="settings"]'));
    }
  }
}
