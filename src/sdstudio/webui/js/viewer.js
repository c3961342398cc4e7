// Full-size view of a result with its metadata, and the denoising capture (x_t, predicted x0, latents per step).
import * as api from "./api.js";
import { $ } from "./dom.js";

export class Viewer {
  constructor() {
    this.dialog = $("#viewer");
    this.frames = [];
    this.timer = null;
    $("#capture-step").addEventListener("input", (e) => this.showFrame(Number(e.target.value)));
    $("#capture-play").addEventListener("click", () => this.play());
    this.dialog.addEventListener("close", () => this.stop());
  }

  async open(result, withCapture = false) {
    if (!result) return;
    $("#viewer-image").src = result.url;
    $("#viewer-image").hidden = withCapture;
    $("#viewer-info").textContent = result.infotext || "";
    $("#capture").hidden = true;
    this.dialog.showModal();
    if (withCapture) await this.loadCapture(result);
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
