// Prompt boxes as A1111 users know them: a token counter per 75-token window, and Ctrl+Up/Down to weight the
// word at the cursor (or the selection): "red" -> "(red:1.1)" -> "(red:1.2)", back down to plain "red".
import * as api from "./api.js";
import { $ } from "./dom.js";

const STEP = 0.1;  // A1111's keyedit_precision_attention

export function bindPromptBox(id, negative) {
  const box = $(`#${id}`), counter = $(`#${id}-tokens`);
  let timer = null;
  const count = async () => {
    try {
      const t = await api.post("/api/v1/tokens", { prompt: box.value, negative });
      counter.textContent = `${t.tokens}/${t.capacity}`;
    } catch {
      counter.textContent = "";  // a syntax error: the Generate check says where
    }
  };
  box.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(count, 250); });
  box.addEventListener("keydown", (e) => {
    if (!(e.ctrlKey || e.metaKey) || !["ArrowUp", "ArrowDown"].includes(e.key)) return;
    e.preventDefault();
    editWeight(box, e.key === "ArrowUp" ? STEP : -STEP);
    box.dispatchEvent(new Event("input", { bubbles: true }));
  });
  count();
}

const round = (w) => Math.round(w * 100) / 100;

export function editWeight(box, delta) {
  const v = box.value;
  let start = box.selectionStart, end = box.selectionEnd;
  // inside "(text:w)": change w; at 1 the brackets go
  const open = v.lastIndexOf("(", start - 1), close = v.indexOf(")", end);
  if (open >= 0 && close >= 0 && !v.slice(open + 1, close).includes("(")) {
    const m = v.slice(open + 1, close).match(/^([\s\S]*):(-?\d+(?:\.\d+)?)$/);
    if (m) {
      const w = round(Number(m[2]) + delta);
      const replaced = w === 1 ? m[1] : `(${m[1]}:${w})`;
      box.value = v.slice(0, open) + replaced + v.slice(close + 1);
      const at = open + (w === 1 ? 0 : 1);
      box.setSelectionRange(at, at + m[1].length);
      return;
    }
  }
  if (start === end) {  // the word at the cursor
    while (start > 0 && !/[\s,()[\]]/.test(v[start - 1])) start--;
    while (end < v.length && !/[\s,()[\]]/.test(v[end])) end++;
  }
  if (start === end) return;
  const text = v.slice(start, end), w = round(1 + delta);
  box.value = `${v.slice(0, start)}(${text}:${w})${v.slice(end)}`;
  box.setSelectionRange(start + 1, start + 1 + text.length);
}
