// The public HTTP API, as any client sees it: JSON in and out, errors as ApiError with the field they concern.

export class ApiError extends Error {
  constructor(status, detail, field) {
    super(detail);
    this.status = status;
    this.field = field || null;
  }
}

async function call(method, path, body) {
  const init = { method, headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `the server cannot be reached (${e.message})`, null);
  }
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) {
    // native: {detail, field}; validation: {detail, errors:[{field}]}; A1111 routes: {detail, errors, error}
    const detail = (data && (data.detail || data.errors)) || response.statusText;
    const field = data && (data.field || (Array.isArray(data.errors) && data.errors[0] && data.errors[0].field));
    throw new ApiError(response.status, typeof detail === "string" ? detail : JSON.stringify(detail), field);
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body === undefined ? {} : body);

// Follow a job's server-sent events until it ends; onProgress gets each progress view. Resolves with the final view.
export function follow(jobId, onProgress) {
  return new Promise((resolve) => {
    const source = new EventSource(`/api/v1/jobs/${jobId}/events`);
    source.addEventListener("progress", (e) => onProgress(JSON.parse(e.data)));
    source.addEventListener("done", (e) => {
      source.close();
      resolve(JSON.parse(e.data));
    });
    source.onerror = async () => {  // the stream broke (server restart, proxy): fall back to polling
      source.close();
      resolve(await poll(jobId, onProgress));
    };
  });
}

async function poll(jobId, onProgress) {
  for (;;) {
    const view = await get(`/api/v1/jobs/${jobId}`);
    if (!["queued", "running"].includes(view.status)) return view;
    onProgress(view);
    await new Promise((r) => setTimeout(r, 500));
  }
}

// Pictures travel as base64 PNG without the data-URL prefix.
export function fileToBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export async function urlToBase64(url) {
  const blob = await (await fetch(url)).blob();
  return fileToBase64(blob);
}

export const pngUrl = (b64) => `data:image/png;base64,${b64}`;
export const canvasToBase64 = (canvas) => canvas.toDataURL("image/png").split(",", 2)[1];
