// Small DOM helpers, and errors shown next to the field they concern.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => {
    const [value, label] = Array.isArray(v) ? v : [v, v];
    return el("option", { value, selected: value === selected }, label);
  }));
}

// The API names a field ("steps", "controlnets.image", "x"); show the message beside it inside `root`.
// Falls back to `fallback` (a general error line) when no element claims the field.
export function showError(root, field, message, fallback) {
  const name = field ? String(field).replace(/^(body|request)\./, "") : "";
  const base = name.split(".")[0];
  const slot = name && ($(`[data-error-for~="${name}"]`, root) || $(`[data-error-for~="${base}"]`, root));
  const holder = name && ($(`[data-for="${name}"]`, root) || $(`[data-for="${base}"]`, root));
  if (holder && !slot) {
    holder.classList.add("invalid");
    let line = holder.querySelector(":scope > .field-error");
    if (!line) holder.append(line = el("p", { class: "field-error" }));
    line.textContent = message;
    line.hidden = false;
    holder.scrollIntoView({ block: "nearest" });
    return line;
  }
  const target = slot || fallback;
  if (!target) return null;
  target.textContent = message;
  target.hidden = false;
  if (holder) holder.classList.add("invalid");
  return target;
}

export function clearErrors(root) {
  for (const node of $$(".invalid", root)) node.classList.remove("invalid");
  for (const node of $$(".field-error", root)) { node.hidden = true; node.textContent = ""; }
}

export function formatSeconds(s) {
  if (!Number.isFinite(s) || s < 0) return "";
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

// A list of unit editors (ControlNet units, image prompts) with a count badge. `make(values, onRemove)` builds
// one editor: an object with `.node` and `.toRequest()`.
export class UnitList {
  constructor(container, countBadge, make) {
    Object.assign(this, { container, badge: countBadge, make, units: [] });
  }

  add(values = {}) {
    const unit = this.make(values, () => this.remove(unit));
    this.units.push(unit);
    this.container.append(unit.node);
    this.update();
    return unit;
  }

  remove(unit) {
    this.units = this.units.filter((u) => u !== unit);
    unit.node.remove();
    this.update();
  }

  clear() {
    for (const unit of [...this.units]) this.remove(unit);
  }

  update() {
    this.badge.textContent = this.units.length ? String(this.units.length) : "";
  }

  toRequest() {
    return this.units.map((u) => u.toRequest());
  }
}
