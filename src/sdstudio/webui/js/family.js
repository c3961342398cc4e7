// What the chosen model's family takes. Flow models (SD3, Flux) sample with Euler on their own shifted schedule,
// read Shift (and, for Flux-dev, the Distilled CFG Scale), and take no image prompts, guidance add-ons or few-step
// presets: their pickers offer only what runs, and those sections are hidden.
import { $, $$, fillSelect } from "./dom.js";

function refill(select, options, fallback) {
  const current = select.value;
  fillSelect(select, options, options.includes(current) ? current : fallback);
}

export function applyFamily(catalog, modelName) {
  const model = catalog.models.find((m) => m.name === (modelName || catalog.default_model)) || {};
  const flow = model.flow || null;
  const d = catalog.defaults;
  refill($("#sampler"), flow ? flow.samplers : catalog.samplers, flow ? flow.samplers[0] : d.sampler);
  refill($("#schedule"), flow ? flow.schedules : catalog.schedules, flow ? flow.schedules[0] : d.schedule);
  for (const node of $$("[data-family]")) {
    const wants = node.dataset.family;  // "flow", "flux-dev" (distilled guidance) or "sd" (not for flow models)
    const shown = wants === "sd" ? !flow : wants === "flow" ? !!flow : !!flow && flow.distilled_cfg;
    node.classList.toggle("family-hidden", !shown);
  }
}
