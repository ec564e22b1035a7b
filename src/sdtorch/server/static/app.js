// The sdtorch web page: plain JavaScript against the AUTOMATIC1111-style API (no framework, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_NAME = "sdtorch-api-key";
let polling = null;  // the running job's token; the progress poller stops when it changes

// ---- HTTP -------------------------------------------------------------------------------------------

class ApiError extends Error {}

function detailText(detail) {
  // FastAPI's validation errors are a list of {loc, msg}; everything else is one string.
  if (Array.isArray(detail)) {
    return detail.map((d) => ((d.loc || []).slice(1).join(".") + ": " + d.msg).replace(/^: /, "")).join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function api(method, path, body) {
  const headers = {};
  const key = sessionStorage.getItem(KEY_NAME);
  if (key) headers["Authorization"] = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.status === 401) {
    $("key-row").hidden = false;
    $("api-key").focus();
    throw new ApiError((data && data.detail ? detailText(data.detail) : "unauthorised") + " (enter the API key above)");
  }
  if (!response.ok) {
    const why = data && data.detail !== undefined ? detailText(data.detail) : response.statusText;
    throw new ApiError(`${response.status}: ${why}`);
  }
  return data;
}

function showError(err) {
  const line = String(err && err.message ? err.message : err).split("\n")[0];
  $("error").textContent = line;
  $("error").title = line;
  $("error").hidden = !line;
}

// ---- start-up: samplers and the model's defaults ----------------------------------------------------

async function loadSettings() {
  const samplers = await api("GET", "/sdapi/v1/samplers");
  const select = $("sampler");
  select.replaceChildren(...samplers.map((s) => new Option(s.name, s.name)));
  const model = await api("GET", "/sdtorch/v1/model");
  $("model-name").textContent = model.name || "";
  for (const field of ["width", "height", "steps", "cfg_scale"]) {
    if (model[field] !== undefined && model[field] !== null) $(field).value = model[field];
  }
  if (model.sampler_name) select.value = model.sampler_name;
  showError("");
}

function saveKey() {
  const key = $("api-key").value.trim();
  if (key) sessionStorage.setItem(KEY_NAME, key); else sessionStorage.removeItem(KEY_NAME);
  $("key-row").hidden = true;
  loadSettings().catch(showError);
}

// ---- init image and mask ----------------------------------------------------------------------------

let painted = false;

function loadInitImage(file) {
  if (!file || !file.type.startsWith("image/")) { showError("not an image: " + (file ? file.name : "")); return; }
  const reader = new FileReader();
  reader.onload = () => {
    const img = $("init-img");
    img.onload = () => {
      const canvas = $("mask");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      painted = false;
      $("init-wrap").hidden = false;
      $("init-tools").hidden = false;
      $("denoise-label").hidden = false;
      $("drop-hint").hidden = true;
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function removeInitImage() {
  $("init-img").removeAttribute("src");
  $("init-wrap").hidden = true;
  $("init-tools").hidden = true;
  $("denoise-label").hidden = true;
  $("drop-hint").hidden = false;
  $("file").value = "";
  clearMask();
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  painted = false;
}

function setupMaskBrush() {
  const canvas = $("mask");
  const ctx = canvas.getContext("2d");
  let last = null;
  const point = (e) => {
    const r = canvas.getBoundingClientRect();
    return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
  };
  const stroke = (from, to) => {
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.strokeStyle = "#e11d48";  // shown at half opacity; only the alpha goes into the mask
    ctx.lineWidth = Number($("brush").value) * scale;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
    painted = true;
  };
  canvas.addEventListener("pointerdown", (e) => {
    canvas.setPointerCapture(e.pointerId);
    last = point(e);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!last) return;
    const p = point(e);
    stroke(last, p);
    last = p;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

function maskDataUrl() {
  // Painted pixels become white (repaint), the rest black.
  const canvas = $("mask");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const src = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const octx = out.getContext("2d");
  const dst = octx.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < src.data.length; i += 4) {
    const v = src.data[i + 3] > 0 ? 255 : 0;
    dst.data[i] = dst.data[i + 1] = dst.data[i + 2] = v;
    dst.data[i + 3] = 255;
  }
  octx.putImageData(dst, 0, 0);
  return out.toDataURL("image/png");
}

function setupDropZone() {
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) loadInitImage(e.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (e) => loadInitImage(e.target.files[0]));
  $("clear-mask").addEventListener("click", clearMask);
  $("remove-image").addEventListener("click", removeInitImage);
  setupMaskBrush();
}

// ---- generation and progress ------------------------------------------------------------------------

function number(id) {
  const value = Number($(id).value);
  if ($(id).value.trim() === "" || !Number.isFinite(value)) throw new ApiError(`${id} is not a number`);
  return value;
}

function buildRequest() {
  const request = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    sampler_name: $("sampler").value,
    cfg_scale: number("cfg_scale"),
    seed: number("seed"),
    n_iter: number("n_iter"),
    batch_size: 1,
  };
  const init = $("init-img").getAttribute("src");
  if (!init) return ["/sdapi/v1/txt2img", request];
  request.init_images = [init];
  request.denoising_strength = number("denoising_strength");
  if (painted) request.mask = maskDataUrl();
  return ["/sdapi/v1/img2img", request];
}

function setProgress(fraction, text) {
  $("progress").value = Math.max(0, Math.min(1, fraction));
  $("progress-text").textContent = text;
}

async function pollProgress(job) {
  while (polling === job) {
    try {
      const p = await api("GET", "/sdapi/v1/progress?skip_current_image=false");
      if (polling !== job) break;
      const s = p.state || {};
      const image = s.job_count > 1 ? `, image ${(s.job_no || 0) + 1}/${s.job_count}` : "";
      const steps = s.sampling_steps ? `${image}, step ${s.sampling_step}/${s.sampling_steps}` : "";
      const eta = p.eta_relative > 0 ? `, ${p.eta_relative.toFixed(1)} s left` : "";
      setProgress(p.progress || 0, `${Math.round(100 * (p.progress || 0))}%${steps}${eta}`);
      if (p.current_image) {
        $("preview").src = "data:image/png;base64," + p.current_image;
        $("preview").hidden = false;
      }
    } catch (err) {
      showError(err);
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

function showResults(response) {
  const info = typeof response.info === "string" ? JSON.parse(response.info) : (response.info || {});
  const seeds = info.all_seeds || [];
  const texts = info.infotexts || [];
  const extra = Math.max(0, response.images.length - seeds.length);  // a grid, when a server sends one first
  const results = $("results");
  results.replaceChildren();
  response.images.forEach((b64, i) => {
    const k = i - extra;
    const seed = k >= 0 ? seeds[k] : null;
    const url = "data:image/png;base64," + b64;
    const figure = document.createElement("figure");
    figure.className = "result";
    const img = document.createElement("img");
    img.src = url;
    img.alt = k >= 0 ? `seed ${seed}` : "grid";
    const caption = document.createElement("figcaption");
    const text = document.createElement("pre");
    text.className = "infotext";
    text.textContent = k >= 0 ? (texts[k] || "") : "grid";
    const link = document.createElement("a");
    link.className = "download";
    link.href = url;
    link.download = `sdtorch-${seed !== null && seed !== undefined ? seed : "grid"}.png`;
    link.textContent = "Download";
    caption.append(text, link);
    if (seed !== null && seed !== undefined) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "use-seed";
      button.textContent = `Use seed ${seed}`;
      button.addEventListener("click", () => { $("seed").value = seed; });
      caption.append(button);
    }
    figure.append(img, caption);
    results.append(figure);
  });
}

async function generate(event) {
  event.preventDefault();
  let path, request;
  try { [path, request] = buildRequest(); } catch (err) { showError(err); return; }
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  setProgress(0, "queued");
  $("preview").hidden = true;
  const job = {};
  polling = job;
  pollProgress(job);
  try {
    const response = await api("POST", path, request);
    showResults(response);
    setProgress(1, `done: ${response.images.length} image${response.images.length === 1 ? "" : "s"}`);
  } catch (err) {
    showError(err);
    setProgress(0, "failed");
  } finally {
    polling = null;
    $("preview").hidden = true;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

async function interrupt() {
  try { await api("POST", "/sdapi/v1/interrupt"); } catch (err) { showError(err); }
}

// ---- wiring ---------------------------------------------------------------------------------------

$("form").addEventListener("submit", generate);
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) $("form").requestSubmit(); });
$("interrupt").addEventListener("click", interrupt);
$("key-row").addEventListener("submit", (e) => { e.preventDefault(); saveKey(); });
$("api-key").value = sessionStorage.getItem(KEY_NAME) || "";
setupDropZone();
loadSettings().catch(showError);
