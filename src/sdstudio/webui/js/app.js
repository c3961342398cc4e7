// Boot: read the catalog, fill the pickers, wire the views. Ctrl+Enter generates (or runs the plot on its page).
import * as api from "./api.js";
import { $, $$, clearErrors, fillSelect, showError } from "./dom.js";
import { applyFamily } from "./family.js";
import { Studio } from "./generate.js";
import { History, watchQueue } from "./history.js";
import { Networks } from "./networks.js";
import { PngInfo } from "./pnginfo.js";
import { bindPromptBox } from "./prompt.js";
import { Settings, loadPrefs } from "./settings.js";
import { Viewer } from "./viewer.js";
import { XYZ } from "./xyz.js";

// The pickers of files in the model folders; `kept` chooses in them (a model name, a VAE).
function fillFilePickers(catalog, kept, networks) {
  fillSelect($("#model"), catalog.models.map((m) => [m.name, m.inpainting ? `${m.name} (inpainting)` : m.name]),
    kept.model);
  fillSelect($("#vae"), [["", "Automatic"], ...catalog.vaes], kept.vae);
  networks.show(catalog.networks);
}

function fillPickers(catalog, networks) {
  const d = catalog.defaults;
  fillFilePickers(catalog, { model: catalog.default_model, vae: "" }, networks);
  fillSelect($("#sampler"), catalog.samplers, d.sampler);
  fillSelect($("#schedule"), catalog.schedules, d.schedule);
  fillSelect($("#masked_content"), catalog.masked_content, d.masked_content);
  fillSelect($("#inpaint_method"), catalog.inpaint_methods, d.inpaint_method);
  fillSelect($("#hr_upscaler"), [...catalog.latent_upscale_modes, ...catalog.upscalers], d.hr_upscaler);
  fillSelect($("#up-upscaler"), catalog.upscalers, "Lanczos");
  for (const [name, p] of Object.entries(catalog.presets)) $("#preset").append(new Option(`${name}: ${p.made_for}`, name));
  for (const name of ["steps", "cfg_scale", "strength", "mask_blur", "only_masked_padding"]) {
    if (d[name] !== undefined) $(`#${name}`).value = d[name];
  }
}

// New files in the model folders, without a reload: the pickers refilled, what was chosen kept when still there.
async function refreshCatalog(studio, networks) {
  const catalog = await api.get("/api/v1/catalog");
  fillFilePickers(catalog, { model: $("#model").value, vae: $("#vae").value }, networks);
  studio.catalog = catalog;
  applyFamily(catalog, $("#model").value);
}

// The server's defaults (Settings page; A1111's options): the model, VAE and clip skip this page starts with.
async function applyServerDefaults(catalog) {
  try {
    const options = await api.get("/sdapi/v1/options");
    const name = String(options.sd_model_checkpoint || "").replace(/ \[[0-9a-f]+\]$/, "");  // "title [hash]"
    const model = catalog.models.find((m) => m.title === options.sd_model_checkpoint || m.name === name);
    if (model) $("#model").value = model.name;
    if (catalog.vaes.includes(options.sd_vae)) $("#vae").value = options.sd_vae;
    if (options.CLIP_stop_at_last_layers) $("#clip_skip").value = options.CLIP_stop_at_last_layers;
  } catch { /* the catalog's defaults stay */ }
}

async function main() {
  const prefs = loadPrefs();
  let catalog;
  try {
    catalog = await api.get("/api/v1/catalog");
  } catch (e) {
    showError(document.body, null, `cannot read the model catalog: ${e.message}`, $("#form-error"));
    return;
  }
  const networks = new Networks($("#networks"));
  fillPickers(catalog, networks);
  const viewer = new Viewer();
  const studio = new Studio(catalog, prefs, viewer);
  const settings = new Settings(prefs, catalog);
  const showView = (name) => {
    clearErrors(document);  // an error belongs to the view it was made in
    for (const b of $$(".tabs button")) b.classList.toggle("active", b.dataset.view === name);
    for (const v of $$(".view")) v.classList.toggle("active", v.id === `view-${name}`);
    if (name === "history") history.refresh();
    if (name === "settings") settings.refresh();
  };
  const history = new History(studio, viewer, showView);
  new PngInfo(studio, showView);
  const xyz = new XYZ(studio, viewer, catalog.xyz_axes);
  for (const b of $$(".tabs button")) b.addEventListener("click", () => showView(b.dataset.view));
  document.addEventListener("keydown", (e) => {
    if (e.key !== "Enter" || !(e.ctrlKey || e.metaKey)) return;
    e.preventDefault();
    if ($("#view-xyz").classList.contains("active")) xyz.run();
    else { showView("generate"); studio.run(e.shiftKey); }  // Ctrl+Shift+Enter: to the front of the queue
  });
  watchQueue($("#queue"), history);
  await applyServerDefaults(catalog);
  // the sampler, schedule and sections the chosen model's family takes, now and whenever the model changes
  $("#model").addEventListener("change", () => applyFamily(studio.catalog, $("#model").value));
  studio.restoreForm();
  applyFamily(catalog, $("#model").value);
  $("#refresh-catalog").addEventListener("click", () => refreshCatalog(studio, networks).catch(
    (e) => showError(document.body, null, `cannot read the model catalog: ${e.message}`, $("#form-error"))));
  bindPromptBox("prompt", false);
  bindPromptBox("negative_prompt", true);
  document.body.dataset.ready = "true";  // the page is wired (browser tests wait for this)
}

main();
