// History: every job the server kept, newest first, with search, status filter and paging; and the queue count.
import * as api from "./api.js";
import { $, el, formatSeconds } from "./dom.js";

const PAGE = 10;

export class History {
  constructor(studio, viewer, showView) {
    this.studio = studio;
    this.viewer = viewer;
    this.showView = showView;
    this.offset = 0;
    this.total = 0;
    let typing = null;
    $("#history-search").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => { this.offset = 0; this.refresh(); }, 250);
    });
    $("#history-status").addEventListener("change", () => { this.offset = 0; this.refresh(); });
    $("#history-prev").addEventListener("click", () => { this.offset = Math.max(0, this.offset - PAGE); this.refresh(); });
    $("#history-next").addEventListener("click", () => {
      if (this.offset + PAGE < this.total) { this.offset += PAGE; this.refresh(); }
    });
  }

  async refresh() {
    const params = new URLSearchParams({ offset: this.offset, limit: PAGE });
    if ($("#history-search").value.trim()) params.set("q", $("#history-search").value.trim());
    if ($("#history-status").value) params.set("status", $("#history-status").value);
    const page = await api.get(`/api/v1/jobs?${params}`);
    this.total = page.total;
    $("#history-page").textContent = page.total
      ? `${this.offset + 1}–${Math.min(this.offset + PAGE, page.total)} of ${page.total}` : "no jobs yet";
    $("#history-prev").disabled = this.offset === 0;
    $("#history-next").disabled = this.offset + PAGE >= page.total;
    $("#history-list").replaceChildren(...page.jobs.map((job) => this.item(job)));
  }

  item(job) {
    const r = job.result;
    const thumb = r && r.images.length
      ? el("img", { src: r.images[0], alt: "", onclick: () => this.viewer.open(this.result(job, 0)) })
      : el("span");
    const when = new Date(job.created * 1000).toLocaleString();
    const status = job.status === "queued" && job.position ? `queued (#${job.position})` : job.status;
    const sub = [job.kind === "xyz" ? "X/Y/Z plot" : job.kind.replace(/^sdapi-/, "API "), status, when, r ? `${r.images.length} image(s), ${formatSeconds(r.seconds)}` : "",
      job.error || ""].filter(Boolean).join(" · ");
    const buttons = [];
    if (r && r.images.length) {
      buttons.push(el("button", { type: "button", class: "rerun", onclick: () => this.rerun(job) }, "Re-run"));
      buttons.push(el("button", { type: "button", onclick: () => this.load(job) }, "Load"));
    }
    if (["queued", "running"].includes(job.status)) {
      buttons.push(el("button", { type: "button", class: "cancel", onclick: async () => {
        await api.post(`/api/v1/jobs/${job.id}/cancel`);
        this.refresh();
      } }, "Cancel"));
    }
    return el("li", { "data-job": job.id },
      thumb,
      el("div", { class: "meta" },
        el("div", { class: "prompt", title: job.prompt }, job.prompt || "(no prompt)"),
        el("div", { class: `sub status-${job.status}` }, sub)),
      el("div", { class: "actions" }, buttons));
  }

  result(job, i) {
    const r = job.result;
    return { url: r.images[i], infotext: r.infotexts[i], seed: r.seeds[i], jobId: job.id, index: i,
      capture: !!(r.captures && r.captures[i]) };
  }

  async load(job) {
    const request = await api.get(`/api/v1/jobs/${job.id}/request`);
    await this.studio.load({ ...request, seed: job.result.seeds[0] });
    this.showView("generate");
  }

  async rerun(job) {
    this.showView("generate");
    await this.studio.rerun(this.result(job, 0), true);
  }
}

// The header's queue button: how many jobs wait or run (polled while the page is open); it opens the list.
export function watchQueue(button, history) {
  let active = [];
  const update = async () => {
    try {
      const [running, queued] = await Promise.all([api.get("/api/v1/jobs?status=running&limit=100"),
        api.get("/api/v1/jobs?status=queued&limit=100")]);
      active = [...running.jobs, ...queued.jobs.reverse()];  // running first, then in queue order
      button.textContent = `queue: ${running.total + queued.total}`;
      button.title = `${running.total} running, ${queued.total} waiting`;
      if ($("#queue-dialog").open) render();
    } catch {
      button.textContent = "queue: ?";
    }
  };
  const render = () => {
    $("#queue-list").replaceChildren(...(active.length ? active.map((job) => history.item(job))
      : [el("li", {}, el("span"), el("span", { class: "hint" }, "Nothing is waiting or running."))]));
  };
  button.addEventListener("click", () => { render(); $("#queue-dialog").showModal(); });
  update();
  return setInterval(update, 2000);
}
