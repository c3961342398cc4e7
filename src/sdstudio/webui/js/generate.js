// The Generate view: build the request from the form, submit it, follow its progress, show the results.
import * as api from "./api.js";
import { controlUnits } from "./control.js";
import { imagePrompts } from "./image_prompts.js";
import { $, clearErrors, el, formatSeconds, showError } from "./dom.js";
import { MODES, applyAspect, readFields, setMode, writeFields } from "./form.js";
import { MaskEditor } from "./mask.js";

const FORM_KEY = "sdstudio.form";  // the form as last edited, restored on reload (pictures left out)
const LAST_KEY = "sdstudio.last";  // the last request submitted, for "Restore last"

function store(key, value) {
  try { localStorage.setItem(key, JSON.stringify(value)); } catch { /* private mode or full: not kept */ }
}

function stored(key) {
  try { return JSON.parse(localStorage.getItem(key) || "null"); } catch { return null; }
}

const withoutPictures = (fields) => {
  const { init_image, mask, controlnets, ip_adapters, ...rest } = fields;
  return rest;
};

class FieldError extends Error {
  constructor(field, message) { super(message); this.field = field; }
}

export class Studio {
  constructor(catalog, prefs, viewer) {
    this.catalog = catalog;
    this.prefs = prefs;
    this.viewer = viewer;
    this.mode = "txt2img";
    this.initImage = null;   // base64 PNG of the picture to work on
    this.jobId = null;       // the job being followed
    this.pending = [];       // jobs this form queued behind it, followed in turn
    this.forever = false;    // Generate forever: submit the form again whenever the page's queue is done
    this.results = [];       // {url, infotext, seed, jobId, index}
    this.selected = 0;
    this.form = $("#gen-form");
    this.mask = new MaskEditor($("#mask-canvas"));
    this.controls = controlUnits($("#control-units"), $("#control-count"), catalog);
    this.imagePrompts = imagePrompts($("#ip-units"), $("#ip-count"), catalog);
    this.bind();
    setMode(this.mode);
  }

  bind() {
    this.form.addEventListener("submit", (e) => { e.preventDefault(); this.run(); });
    for (const kind of ["input", "change"]) this.form.addEventListener(kind, () => this.saveForm());
    $("#restore-last").addEventListener("click", () => {
      const last = stored(LAST_KEY);
      if (last) { writeFields(last.fields); this.setMode(last.mode); this.saveForm(); }
    });
    $("#cancel").addEventListener("click", () => { this.setForever(false); this.cancel(); });
    $("#forever").addEventListener("click", () => this.setForever(!this.forever));
    $("#interrupt").addEventListener("click", () => this.interrupt("interrupt"));
    $("#skip").addEventListener("click", () => this.interrupt("skip"));
    for (const button of document.querySelectorAll(".modes button")) {
      button.addEventListener("click", () => this.setMode(button.dataset.mode));
    }
    $("#preset").addEventListener("change", (e) => {  // a few-step preset fills sampler, schedule, steps and CFG
      const chosen = this.catalog.presets[e.target.value];
      if (chosen) {
        writeFields(chosen.fields);
        const lora = chosen.loras[$("#model").value || this.catalog.default_model];  // the model's few-step LoRA
        const prompt = $("#prompt");
        if (lora && !prompt.value.toLowerCase().includes(`<lora:${lora.toLowerCase()}:`)) {
          prompt.value = `${prompt.value.trim()} <lora:${lora}:1>`.trim();
        }
        this.saveForm();
      }
      e.target.value = "";
    });
    $("#aspect").addEventListener("change", (e) => { applyAspect(e.target.value, this.nativeSize()); e.target.value = ""; });
    $("#seed-random").addEventListener("click", () => { $("#seed").value = -1; });
    $("#seed-reuse").addEventListener("click", () => {
      const last = this.results[this.selected];
      if (last) $("#seed").value = last.seed;
    });
    this.bindImageInput();
    $("#brush").addEventListener("click", () => this.tool(false));
    $("#eraser").addEventListener("click", () => this.tool(true));
    $("#brush-size").addEventListener("input", (e) => { this.mask.size = Number(e.target.value); });
    $("#mask-invert").addEventListener("click", () => this.mask.invert());
    $("#mask-clear").addEventListener("click", () => this.mask.clear());
    $("#control-add").addEventListener("click", () => this.controls.add());
    $("#ip-add").addEventListener("click", () => this.imagePrompts.add());
    $("#result-main").addEventListener("click", () => this.viewer.open(this.results[this.selected], false,
                                                                       this.results));
    $("#send-img2img").addEventListener("click", () => this.sendTo("img2img"));
    $("#send-inpaint").addEventListener("click", () => this.sendTo("inpaint"));
    $("#rerun").addEventListener("click", () => this.rerun(this.results[this.selected]));
    $("#show-capture").addEventListener("click", () => this.viewer.open(this.results[this.selected], true));
  }

  nativeSize() {
    const model = this.catalog.models.find((m) => m.name === $("#model").value);
    return (model && model.size) || 512;
  }

  tool(erasing) {
    this.mask.erasing = erasing;
    $("#brush").classList.toggle("active", !erasing);
    $("#eraser").classList.toggle("active", erasing);
  }

  setMode(mode) {
    this.mode = mode;
    setMode(mode);
    this.saveForm();
  }

  saveForm() {
    store(FORM_KEY, { mode: this.mode, fields: withoutPictures(readFields(this.mode)) });
  }

  // After the server's defaults are applied: the form as the user left it before the reload.
  restoreForm() {
    const saved = stored(FORM_KEY);
    if (!saved || !saved.fields) return;
    writeFields(saved.fields);
    if (MODES.includes(saved.mode)) { this.mode = saved.mode; setMode(saved.mode); }
    $("#restore-last").disabled = !stored(LAST_KEY);
  }

  bindImageInput() {
    const zone = $("#dropzone"), file = $("#init-file");
    $("#init-browse").addEventListener("click", () => file.click());
    file.addEventListener("change", async () => { if (file.files[0]) await this.setImage(await api.fileToBase64(file.files[0])); });
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", async (e) => {
      e.preventDefault();
      zone.classList.remove("over");
      const dropped = e.dataTransfer.files[0];
      if (dropped) await this.setImage(await api.fileToBase64(dropped));
    });
  }

  // Show the picture to work on; the mask canvas takes its pixel size (and is cleared).
  async setImage(b64, maskB64 = null) {
    this.initImage = b64;
    const img = $("#init-preview");
    img.src = api.pngUrl(b64);
    await img.decode();
    this.mask.reset(img.naturalWidth, img.naturalHeight);
    if (maskB64) await this.mask.load(api.pngUrl(maskB64));
    $("#canvas-wrap").hidden = false;
    $("#dropzone .hint").hidden = true;
  }

  // The request of the current mode, or a FieldError saying what is missing.
  request() {
    const fields = readFields(this.mode);
    if (this.mode !== "txt2img") {
      if (!this.initImage) throw new FieldError("init_image", "drop an image to work on first");
      fields.init_image = this.initImage;
    }
    if (this.mode === "inpaint") {
      if (this.mask.isEmpty()) throw new FieldError("mask", "paint over the part of the image to repaint");
      fields.mask = this.mask.toBase64();
    }
    if (this.mode !== "outpaint" && this.mode !== "upscale") {
      fields.controlnets = this.controls.toRequest();
      fields.ip_adapters = this.imagePrompts.toRequest();
    }
    return fields;
  }

  // Submit the form as a job. While one is being followed, the new one joins the server's queue (at its front
  // with `front`, Ctrl+Shift+Enter) and is followed when its turn comes (A1111 users press Generate again to
  // queue). With Generate forever on, the form is submitted again each time the queue this page made is done.
  async run(front = false) {
    clearErrors(this.form);
    try {
      if (this.mode === "upscale") return await this.upscale();
      const jobId = await this.submit(front);
      if (this.jobId) {
        if (front) this.pending.unshift(jobId); else this.pending.push(jobId);
        this.queued();
        return;
      }
      await this.followAll(jobId);
    } catch (e) {
      this.setForever(false);
      this.error(e);
    }
  }

  async submit(front = false) {
    const request = this.request();
    store(LAST_KEY, { mode: this.mode, fields: withoutPictures(request) });
    $("#restore-last").disabled = false;
    const job = this.mode === "outpaint"
      ? await api.post("/api/v1/outpaint", { request, ...this.outpaintSides() })
      : await api.post("/api/v1/jobs", { request });
    if (front) await api.post(`/api/v1/jobs/${job.id}/front`);
    return job.id;
  }

  async followAll(jobId) {
    for (let next = jobId; next;) {
      await this.follow(next);
      next = this.pending.shift() || (this.forever && this.mode !== "upscale" ? await this.submit() : null);
    }
  }

  setForever(on) {
    this.forever = on;
    $("#forever").setAttribute("aria-pressed", String(on));
    $("#forever").textContent = on ? "Stop forever" : "Generate forever";
    if (on && !this.jobId) this.run();
  }

  queued() {
    $("#queued").textContent = this.pending.length ? `+${this.pending.length} queued` : "";
  }

  outpaintSides() {
    const n = (id) => Number($(`#${id}`).value);
    return { left: n("out-left"), right: n("out-right"), up: n("out-up"), down: n("out-down"),
      prefill: $("#out-prefill").value, overlap: n("out-overlap") };
  }

  async upscale() {
    if (!this.initImage) throw new FieldError("init_image", "drop an image to upscale first");
    this.busy(true, null);
    try {
      const out = await api.post("/sdapi/v1/extra-single-image", {
        image: this.initImage, upscaling_resize: Number($("#up-scale").value), upscaler_1: $("#up-upscaler").value });
      this.show([{ url: api.pngUrl(out.image), infotext: out.html_info, seed: null, jobId: null, index: 0 }]);
    } finally {
      this.busy(false, null);
    }
  }

  async follow(jobId) {
    this.busy(true, jobId);
    const started = performance.now();
    try {
      const view = await api.follow(jobId, (v) => this.progress(v, started));
      this.finish(view);
    } finally {
      this.busy(false, null);
    }
  }

  busy(on, jobId) {
    this.jobId = jobId;
    this.queued();
    if (on && $("#view-generate .output").getBoundingClientRect().top > innerHeight) {
      $("#progress").hidden = false;
      $("#view-generate .output").scrollIntoView({ block: "start" });  // narrow screens: the output is below the form
    }
    $("#generate").disabled = on && !jobId;  // a queued job can always be added; a synchronous upscale cannot
    for (const id of ["#cancel", "#interrupt", "#skip"]) $(id).disabled = !on || !jobId;
    $("#progress").hidden = !on;
    if (!on) {
      $("#preview").hidden = true;
    } else if (jobId) {
      this.progress({ status: "queued", position: null }, performance.now());
    } else {  // a synchronous call (upscale): no steps to show
      $("#progress-fill").style.width = "0%";
      $("#progress-text").textContent = "working…";
    }
  }

  progress(view, started) {
    const fraction = view.status === "running" ? (view.progress || 0) : 0;
    $("#progress-fill").style.width = `${Math.round(fraction * 100)}%`;
    const eta = fraction > 0 ? (performance.now() - started) / 1000 * (1 - fraction) / fraction : NaN;
    $("#progress-text").textContent = view.status === "queued"
      ? `queued${view.position ? `, position ${view.position}` : ""}`
      : `${Math.round(fraction * 100)}%${eta ? `, ETA ${formatSeconds(eta)}` : ""}`;
    if (view.preview && this.prefs.preview) {
      $("#preview").src = api.pngUrl(view.preview);
      $("#preview").hidden = false;
      $("#result-main").hidden = true;
    }
  }

  async cancel() {
    if (!this.jobId) return;
    await api.post(`/api/v1/jobs/${this.jobId}/cancel`);
  }

  // Interrupt keeps what is finished (the job ends done with those images); skip ends the current batch only.
  async interrupt(how) {
    if (!this.jobId) return;
    try {
      await api.post(`/api/v1/jobs/${this.jobId}/interrupt?how=${how}`);
    } catch (e) {
      this.error(e);  // e.g. still queued: nothing to interrupt yet
    }
  }

  finish(view) {
    if (view.status === "done") {
      const r = view.result;
      this.show(r.images.map((url, i) => ({ url, infotext: r.infotexts[i], seed: r.seeds[i], jobId: view.id, index: i,
        capture: !!(r.captures && r.captures[i]) })), r.warnings || []);
    } else if (view.status === "cancelled") {
      this.error(new Error("cancelled"));
    } else {
      this.error(new Error(view.error || `the job ended as ${view.status}`));
    }
  }

  show(results, warnings = []) {
    this.results = results;
    $("#gallery").replaceChildren(...results.map((r, i) => el("img", { src: r.url, alt: `image ${i + 1}`, onclick: () => this.select(i) })));
    $("#warnings").replaceChildren(...warnings.map((w) => el("li", {}, w)));
    this.select(0);
    const output = $("#view-generate .output").getBoundingClientRect();
    if (matchMedia("(max-width: 900px)").matches && output.top < innerHeight && output.bottom > 0) {
      const image = $("#result-main");  // a phone showing the progress: then the whole result, once it has a size
      image.decode().catch(() => {}).then(() => $("#view-generate .output").scrollIntoView({ block: "start" }));
    }
  }

  select(i) {
    const r = this.results[i];
    if (!r) return;
    this.selected = i;
    $("#result-main").src = r.url;
    $("#result-main").hidden = false;
    $("#preview").hidden = true;
    $("#infotext").textContent = r.infotext || "";
    $("#download").href = r.url;
    $("#download").download = `sdstudio-${r.seed ?? "upscaled"}.png`;
    $("#result-actions").hidden = false;
    $("#rerun").hidden = !r.jobId;
    $("#show-capture").hidden = !r.capture;
    document.querySelectorAll("#gallery img").forEach((img, k) => img.classList.toggle("selected", k === i));
  }

  async sendTo(mode) {
    const r = this.results[this.selected];
    if (!r) return;
    await this.setImage(r.url.startsWith("data:") ? r.url.split(",", 2)[1] : await api.urlToBase64(r.url));
    this.setMode(mode);
  }

  // Load a stored job's exact request into the form (pictures included).
  async load(request) {
    writeFields(request);
    const mode = request.mask ? "inpaint" : request.init_image ? "img2img" : "txt2img";
    if (request.init_image) await this.setImage(request.init_image, request.mask || null);
    this.controls.clear();
    for (const unit of request.controlnets || []) this.controls.add(unit);
    this.imagePrompts.clear();
    for (const unit of request.ip_adapters || []) {  // a record keeps pictures by hash: those units need new ones
      const images = (unit.images || []).filter((im) => typeof im === "string");
      if (images.length) this.imagePrompts.add({ ...unit, images });
    }
    this.setMode(mode);
  }

  // Re-run: the job's stored request with the seed actually used, so the same image comes back. From a result,
  // that image alone (a batch of one); from history, the whole job (its first seed, same batch).
  async rerun(result, wholeJob = false) {
    const request = await api.get(`/api/v1/jobs/${result.jobId}/request`);
    const seed = result.seed;
    await this.load(wholeJob ? { ...request, seed } : { ...request, seed, batch_size: 1, n_iter: 1 });
    await this.run();
  }

  error(e) {
    const field = e.field || null;
    const root = /^(model|vae)$/.test(field) ? document.body : this.form;  // the pickers are in the header
    showError(root, field, e.message, $("#form-error"));
  }
}
