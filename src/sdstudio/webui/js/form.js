// The Generate form <-> GenerationRequest fields (the JSON that POST /api/v1/jobs takes).
import { $, $$ } from "./dom.js";

// inputs whose id is the request field's name
const NUMBERS = ["steps", "cfg_scale", "seed", "batch_size", "n_iter", "strength", "clip_skip", "capture_every",
  "subseed", "subseed_strength", "mask_blur", "only_masked_padding", "hr_scale", "hr_second_pass_steps", "pag_scale",
  "apg_eta", "apg_norm_threshold", "apg_momentum", "distilled_cfg_scale", "shift"];
const TEXTS = ["prompt", "negative_prompt", "sampler", "schedule", "masked_content", "inpaint_method", "hr_upscaler",
  "guidance"];
const CHECKS = ["only_masked", "soft_inpainting", "keep_unmasked", "enable_hr"];
const OPTIONAL_NUMBERS = ["width", "height", "eta"];  // empty: null (the model's size, the sampler's eta)
export const MODES = ["txt2img", "img2img", "inpaint", "outpaint", "upscale"];

const value = (id) => $(`#${id}`).value;

export function readFields(mode) {
  const f = {};
  for (const name of TEXTS) f[name] = value(name);
  for (const name of NUMBERS) f[name] = Number(value(name));
  for (const name of CHECKS) f[name] = $(`#${name}`).checked;
  for (const name of OPTIONAL_NUMBERS) f[name] = value(name) === "" ? null : Number(value(name));
  // FreeU: the family's published values, or the ones a loaded request brought
  f.freeu = $("#freeu").checked ? (JSON.parse($("#freeu").dataset.values || "null") || true) : false;
  f.model = value("model") || null;
  f.vae = value("vae") || null;
  if (mode === "txt2img" && f.enable_hr) f.strength = Number(value("hr_strength"));  // the second pass's denoise
  if (mode !== "txt2img") f.enable_hr = false;
  if (mode !== "inpaint") {
    for (const name of ["only_masked", "soft_inpainting"]) delete f[name];
  }
  if (mode === "outpaint") { f.width = null; f.height = null; }
  return f;
}

// Put request fields (from history, PNG info or a result) into the form; unknown fields are ignored.
export function writeFields(fields) {
  for (const name of [...TEXTS, ...NUMBERS, ...OPTIONAL_NUMBERS]) {
    if (fields[name] === undefined) continue;
    const input = $(`#${name}`);
    if (input.tagName === "SELECT" && fields[name] !== null && ![...input.options].some((o) => o.value === String(fields[name]))) {
      input.append(new Option(fields[name], fields[name]));  // e.g. a sampler of another install: keep it visible
    }
    input.value = fields[name] === null ? "" : fields[name];
  }
  for (const name of CHECKS) if (fields[name] !== undefined) $(`#${name}`).checked = !!fields[name];
  if (fields.freeu !== undefined) {
    $("#freeu").checked = !!fields.freeu;
    $("#freeu").dataset.values = Array.isArray(fields.freeu) ? JSON.stringify(fields.freeu) : "";
  }
  if (fields.enable_hr && fields.strength !== undefined) $("#hr_strength").value = fields.strength;
  for (const name of ["model", "vae"]) {
    if (fields[name] === undefined) continue;
    const select = $(`#${name}`);
    const wanted = fields[name] || "";
    const match = [...select.options].find((o) => o.value === wanted || o.textContent === wanted);
    if (match) select.value = match.value;
  }
  $("#model").dispatchEvent(new Event("change"));  // the family's pickers (family.js), the loaded sampler kept
}

export function setMode(mode) {
  for (const button of $$(".modes button")) button.classList.toggle("active", button.dataset.mode === mode);
  for (const node of $$("#gen-form .only")) node.hidden = !node.dataset.modes.split(" ").includes(mode);
  $("#canvas-wrap").classList.toggle("masking", mode === "inpaint");
  $("#generate").textContent = mode === "upscale" ? "Upscale" : "Generate";
}

// Aspect presets keep the longer side (or the model's size) and round to the latent grid of 8.
export function applyAspect(preset, nativeSize) {
  const w = $("#width"), h = $("#height");
  if (preset === "swap") {
    [w.value, h.value] = [h.value, w.value];
    return;
  }
  const [a, b] = preset.split(":").map(Number);
  const long = Math.max(Number(w.value) || nativeSize, Number(h.value) || nativeSize);
  const round8 = (x) => Math.max(8, Math.round(x / 8) * 8);
  if (a >= b) { w.value = round8(long); h.value = round8(long * b / a); } else { h.value = round8(long); w.value = round8(long * a / b); }
}
