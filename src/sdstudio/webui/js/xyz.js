// X/Y/Z plot: the Generate form's request varied along up to three axes, run as one queued job (POST /api/v1/xyz).
import * as api from "./api.js";
import { $, $$, clearErrors, el, fillSelect, showError } from "./dom.js";

export class XYZ {
  constructor(studio, viewer, axes) {
    this.studio = studio;
    this.viewer = viewer;
    this.running = false;
    const defaults = ["cfg", "steps", "seed"];
    const names = axes.map((a) => [a.name, a.name]);  // catalog.xyz_axes: {name, help}
    $$("#view-xyz .axis-name").forEach((select, i) => fillSelect(select, names, defaults[i]));
    $("#xyz-run").addEventListener("click", () => this.run());
    $("#xyz-grid").addEventListener("click", () => this.viewer.open(this.grid));
  }

  // The first Z slice's cells as a labelled table of images; each opens (with its row) in the lightbox.
  showCells(job) {
    const r = job.result, [nx, ny] = r.shape, perCell = (r.images.length - r.grids) / r.shape.reduce((a, b) => a * b);
    const cell = (i, j) => {
      const k = r.grids + (j * nx + i) * perCell;
      return { url: r.images[k], infotext: r.infotexts[k], seed: r.seeds[k], jobId: job.id, index: k };
    };
    const all = [];
    const rows = [el("tr", {}, el("th", {}), ...r.labels.x.map((l) => el("th", {}, l)))];
    for (let j = 0; j < ny; j++) {
      const cells = [];
      for (let i = 0; i < nx; i++) {
        const c = cell(i, j);
        all.push(c);
        cells.push(el("td", {}, el("img", { src: c.url, alt: `${r.labels.x[i] || ""} ${r.labels.y[j] || ""}`,
          onclick: () => this.viewer.open(c, false, all) })));
      }
      rows.push(el("tr", {}, el("th", {}, r.labels.y[j] || ""), ...cells));
    }
    $("#xyz-cells").replaceChildren(...rows);
    $("#xyz-cells").hidden = false;
  }

  axis(letter) {
    const row = $(`#view-xyz .axis[data-for="${letter}"]`);
    const values = $(".axis-values", row).value.trim();
    return values ? `${$(".axis-name", row).value}=${values}` : null;
  }

  async run() {
    if (this.running) return;
    const view = $("#view-xyz");
    clearErrors(view);
    clearErrors($("#gen-form"));
    let job;
    try {
      const request = this.studio.request();
      job = await api.post("/api/v1/xyz", { request, x: this.axis("x"), y: this.axis("y"), z: this.axis("z") });
    } catch (e) {
      const inView = showError(view, e.field, e.message, null);
      if (!inView) showError(view, null, `${e.field ? `${e.field}: ` : ""}${e.message} (see the Generate form)`, $("#xyz-error"));
      return;
    }
    this.running = true;
    const bar = $("#xyz-progress");
    bar.hidden = false;
    try {
      const done = await api.follow(job.id, (v) => {
        const f = v.status === "running" ? v.progress || 0 : 0;
        $(".fill", bar).style.width = `${Math.round(f * 100)}%`;
        $("span", bar).textContent = v.status === "queued" ? "queued" : `${Math.round(f * 100)}%`;
      });
      if (done.status !== "done") throw new Error(done.error || `the plot ended as ${done.status}`);
      const r = done.result;
      this.grid = { url: r.images[0], infotext: r.infotexts[0], seed: r.seeds[0], jobId: done.id, index: 0 };
      $("#xyz-grid").src = r.images[0];
      $("#xyz-grid").hidden = false;
      this.showCells(done);
    } catch (e) {
      showError(view, null, e.message, $("#xyz-error"));
    } finally {
      this.running = false;
      bar.hidden = true;
    }
  }
}
