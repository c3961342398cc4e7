// Full-size view of a result with its metadata, and the denoising capture (x_t, predicted x0, latents per step).
import * as api from "./api.js";
import { $ } from "./dom.js";

export class Viewer {
  constructor() {
    this.dialog = $("#viewer");
    this.frames = [];
    this.timer = null;
    this.list = [];    // the batch the shown result belongs to: arrows step through it
    this.index = 0;
    $("#viewer-prev").addEventListener("click", () => this.step(-1));
    $("#viewer-next").addEventListener("click", () => this.step(1));
    $("#viewer-image").addEventListener("click", () => this.zoom());
    this.dialog.addEventListener("keydown", (e) => {
      if (e.key === "ArrowLeft") this.step(-1);
      if (e.key === "ArrowRight") this.step(1);
    });
    $("#capture-step").addEventListener("input", (e) => this.showFrame(Number(e.target.value)));
    $("#capture-play").addEventListener("click", () => this.play());
    this.dialog.addEventListener("close", () => this.stop());
  }

  // Show `result` (from `list`, its batch, when given) fitted to the screen; Esc closes (a <dialog>).
  async open(result, withCapture = false, list = null) {
    if (!result) return;
    this.list = list && list.includes(result) ? list : [result];
    this.index = this.list.indexOf(result);
    this.show();
    $("#viewer-image").hidden = withCapture;
    $("#capture").hidden = true;
    if (!this.dialog.open) this.dialog.showModal();
    if (withCapture) await this.loadCapture(result);
  }

  show() {
    const result = this.list[this.index];
    const image = $("#viewer-image");
    image.classList.remove("zoomed");
    image.style.height = "";
    image.src = result.url;
    $("#viewer-info").textContent = result.infotext || "";
    const many = this.list.length > 1;
    $("#viewer-count").textContent = many ? `${this.index + 1} / ${this.list.length}` : "";
    for (const id of ["#viewer-prev", "#viewer-next"]) $(id).hidden = !many;
  }

  step(by) {
    if (this.list.length < 2) return;
    this.index = (this.index + by + this.list.length) % this.list.length;
    this.show();
  }

  // Fitted <-> twice the natural size (the stage scrolls).
  zoom() {
    const image = $("#viewer-image");
    const zoomed = image.classList.toggle("zoomed");
    image.style.height = zoomed ? `${image.naturalHeight * 2}px` : "";
  }

  async loadCapture(result) {
    const capture = await api.get(`/api/v1/images/${result.jobId}/${result.index}/capture`);
    this.frames = capture.frames;
    const slider = $("#capture-step");
    slider.max = String(this.frames.length - 1);
    slider.value = String(this.frames.length - 1);
    $("#capture-gif").href = capture.animation;
    $("#capture").hidden = false;
    this.showFrame(this.frames.length - 1);
  }

  showFrame(i) {
    const frame = this.frames[i];
    if (!frame) return;
    $("#frame-xt").src = frame.xt;
    $("#frame-x0").src = frame.x0;
    $("#frame-latents").src = frame.latents;
    $("#capture-label").textContent = `step ${frame.step} of ${this.frames[this.frames.length - 1].step}`;
    $("#capture-step").value = String(i);
  }

  play() {
    this.stop();
    let i = 0;
    this.timer = setInterval(() => {
      this.showFrame(i);
      if (++i >= this.frames.length) this.stop();
    }, 350);
  }

  stop() {
    clearInterval(this.timer);
    this.timer = null;
  }
}
