// Painting an inpainting mask over the image: brush, eraser, size, invert, clear.
// The canvas has the image's own pixel size; painted pixels are opaque white (shown at half opacity), and
// the mask sent to the API is white where painted, black elsewhere (alpha -> grey level, so soft edges stay soft).

const PAINT = [255, 255, 255];  // shown white at half opacity, as A1111 paints masks

export class MaskEditor {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { willReadFrequently: true });
    this.size = 24;        // brush diameter in screen pixels (as the user sees it)
    this.erasing = false;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => this.start(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const name of ["pointerup", "pointercancel", "pointerleave"]) canvas.addEventListener(name, () => { this.last = null; });
  }

  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
  }

  point(e) {  // client coordinates -> image pixels
    const box = this.canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * this.canvas.width / box.width, (e.clientY - box.top) * this.canvas.height / box.height];
  }

  start(e) {
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last) return;
    const next = this.point(e);
    this.stroke(this.last, next);
    this.last = next;
  }

  stroke([x0, y0], [x1, y1]) {
    const c = this.ctx;
    c.globalCompositeOperation = this.erasing ? "destination-out" : "source-over";
    c.strokeStyle = c.fillStyle = `rgb(${PAINT.join(",")})`;
    c.lineWidth = this.size * this.canvas.width / this.canvas.getBoundingClientRect().width;  // -> image pixels
    c.lineCap = c.lineJoin = "round";
    c.beginPath();
    c.moveTo(x0, y0);
    c.lineTo(x1 + 0.01, y1);  // a click paints a dot
    c.stroke();
  }

  invert() {
    const data = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      px[i] = PAINT[0]; px[i + 1] = PAINT[1]; px[i + 2] = PAINT[2];
      px[i + 3] = 255 - px[i + 3];
    }
    this.ctx.putImageData(data, 0, 0);
  }

  isEmpty() {
    const px = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height).data;
    for (let i = 3; i < px.length; i += 4) if (px[i] > 0) return false;
    return true;
  }

  // The mask as a greyscale picture (white = repaint), base64 PNG.
  toBase64() {
    const { width, height } = this.canvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const src = this.ctx.getImageData(0, 0, width, height).data;
    const octx = out.getContext("2d");
    const dst = octx.createImageData(width, height);
    for (let i = 0; i < src.length; i += 4) {
      dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = src[i + 3];
      dst.data[i + 3] = 255;
    }
    octx.putImageData(dst, 0, 0);
    return out.toDataURL("image/png").split(",", 2)[1];
  }

  // Show an existing mask (white = repaint), e.g. when a job is loaded from history.
  async load(url) {
    const image = new Image();
    image.src = url;
    await image.decode();
    this.reset(image.naturalWidth, image.naturalHeight);
    this.ctx.drawImage(image, 0, 0);
    const data = this.ctx.getImageData(0, 0, this.canvas.width, this.canvas.height);
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      px[i + 3] = px[i];
      px[i] = PAINT[0]; px[i + 1] = PAINT[1]; px[i + 2] = PAINT[2];
    }
    this.ctx.putImageData(data, 0, 0);
  }
}
