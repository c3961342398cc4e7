// LoRA and embedding cards (A1111's extra networks): name and preview picture; a click puts the LoRA or
// embedding in the prompt box last used (the prompt by default), a second click takes it out again.
import { $, el } from "./dom.js";

const token = (card) => (card.kind === "lora" ? `<lora:${card.name}:1>` : card.name);

const escaped = (text) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

// `text` with `piece` appended after a comma, or with it taken out (a LoRA at any weight) when it is there.
export function toggled(text, piece) {
  const lora = piece.startsWith("<lora:");
  const pattern = new RegExp(lora ? `,?\\s*${escaped(piece.slice(0, -2))}[^>]*>`
    : `,?\\s*(?<![\\w-])${escaped(piece)}(?![\\w-])`);
  if (pattern.test(text)) return text.replace(pattern, "").replace(/^\s*,\s*/, "");
  return text.trim() ? `${text.trim()}, ${piece}` : piece;
}

export class Networks {
  constructor(root) {
    this.root = root;
    this.target = "prompt";
    for (const id of ["prompt", "negative_prompt"]) $(`#${id}`).addEventListener("focus", () => { this.target = id; });
    $("#network-filter", root).addEventListener("input", () => this.filter());
  }

  show(cards) {
    $("#network-count", this.root).textContent = cards.length ? `(${cards.length})` : "(none found)";
    $("#network-cards", this.root).replaceChildren(...cards.map((card) => el("button", {
      type: "button", class: "card", "data-kind": card.kind, "data-name": card.name,
      title: `${card.kind === "lora" ? "LoRA" : "embedding"} ${card.name}: click to add to the prompt or take out`,
      onclick: () => this.insert(card),
    }, card.preview ? el("img", { src: card.preview, alt: "", loading: "lazy" }) : el("span", { class: "initial" }, card.name[0] || "?"),
    el("span", { class: "name" }, card.name), el("span", { class: "kind" }, card.kind === "lora" ? "LoRA" : "embedding"))));
    this.filter();
  }

  filter() {
    const words = $("#network-filter", this.root).value.toLowerCase();
    for (const card of this.root.querySelectorAll(".card")) card.hidden = !card.dataset.name.toLowerCase().includes(words);
  }

  insert(card) {
    const box = $(`#${this.target}`);
    box.value = toggled(box.value, token(card));
    box.dispatchEvent(new Event("input", { bubbles: true }));  // the token counter and the saved form follow
  }
}
