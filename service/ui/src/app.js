// xmag-serve viewer: sign in with an API key, upload a slide, follow jobs, view results.
// The key lives in this tab's sessionStorage and travels only as an Authorization header
// (fetch, XMLHttpRequest and OpenSeadragon's Ajax tile loading); it is never put in a URL.
"use strict";

(() => {
  const KEY_STORE = "xmag.apiKey";
  const REQUESTS_STORE = "xmag.jobRequests"; // job id -> submitted body, for Retry of path jobs
  const POLL_MS = 1000;
  const HASH_CHUNK_BYTES = 4 * 1024 * 1024;
  const FINAL = new Set(["succeeded", "failed", "canceled", "dead"]);

  const $ = (id) => document.getElementById(id);
  const state = { pollTimer: null, viewer: null, overlay: null };
  // Tests and people debugging read the viewer's state here.
  window.xmagViewer = state;

  // -- API ---------------------------------------------------------------------------------------
  const apiKey = () => sessionStorage.getItem(KEY_STORE);

  class ApiError extends Error {
    constructor(status, problem) {
      super(problem.detail || `HTTP ${status}`);
      this.status = status;
      this.code = problem.code || `HTTP_${status}`;
    }
  }

  async function api(path, options = {}) {
    const headers = { ...(options.headers || {}), Authorization: `Bearer ${apiKey()}` };
    const response = await fetch(path, { ...options, headers, cache: "no-store" });
    if (!response.ok) {
      let problem = {};
      try {
        problem = await response.json();
      } catch (_) {
        problem = { detail: response.statusText };
      }
      if (response.status === 401) signOut(`${problem.code}: ${problem.detail}`);
      throw new ApiError(response.status, problem);
    }
    return response;
  }
  const apiJson = async (path, options) => (await api(path, options)).json();

  const describe = (err) => (err instanceof ApiError ? `${err.code}: ${err.message}` : String(err));

  function showError(id, err) {
    const box = $(id);
    if (!err) {
      box.hidden = true;
      box.textContent = "";
      return;
    }
    box.hidden = false;
    box.textContent = typeof err === "string" ? err : describe(err);
  }

  // -- routing -----------------------------------------------------------------------------------
  const VIEWS = ["login-view", "new-view", "jobs-view", "result-view"];

  function show(view) {
    for (const v of VIEWS) $(v).hidden = v !== view;
    $("nav").hidden = view === "login-view";
  }

  function route() {
    clearTimeout(state.pollTimer);
    if (!apiKey()) {
      show("login-view");
      return;
    }
    const hash = location.hash || "#/jobs";
    if (hash.startsWith("#/job/")) {
      openResult(decodeURIComponent(hash.slice("#/job/".length)));
    } else if (hash === "#/new") {
      show("new-view");
      loadTasks();
    } else {
      show("jobs-view");
      pollJobs();
    }
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORE);
    show("login-view");
    showError("login-error", message || null);
  }

  // -- sign in -----------------------------------------------------------------------------------
  async function signIn(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    showError("login-error", null);
    const response = await fetch("/v1/jobs?limit=1", {
      headers: { Authorization: `Bearer ${key}` },
      cache: "no-store",
    });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({}));
      showError("login-error", `Key refused (${problem.code || response.status}): ${problem.detail || ""}`);
      return;
    }
    sessionStorage.setItem(KEY_STORE, key);
    $("api-key").value = "";
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    route();
  }

  // -- new job -----------------------------------------------------------------------------------
  async function loadTasks() {
    try {
      const { models } = await apiJson("/v1/models");
      const heads = models.flatMap((m) => (m.card && m.card.heads) || []);
      if (!heads.length) return;
      const box = $("task-list");
      box.textContent = "Tasks: ";
      for (const head of heads) {
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "checkbox";
        input.checked = true;
        input.value = head.name;
        input.className = "task";
        label.append(input, ` ${head.name} (${head.level} head)`);
        box.append(label);
      }
    } catch (err) {
      showError("submit-error", err);
    }
  }

  function setProgress(fraction, text) {
    $("upload-bar").style.width = `${Math.round(fraction * 100)}%`;
    $("upload-status").textContent = text;
  }

  async function sha256OfFile(file) {
    const hash = sha256.create();
    for (let offset = 0; offset < file.size; offset += HASH_CHUNK_BYTES) {
      const chunk = await file.slice(offset, offset + HASH_CHUNK_BYTES).arrayBuffer();
      hash.update(chunk);
      setProgress(
        Math.min(file.size, offset + HASH_CHUNK_BYTES) / file.size / 2,
        `Computing sha256: ${Math.round(((offset + chunk.byteLength) / file.size) * 100)}%`,
      );
    }
    return hash.hex();
  }

  function putSlide(file, sha) {
    // XMLHttpRequest, not fetch: it reports upload progress, and sends the File streamed.
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", `/v1/slides?filename=${encodeURIComponent(file.name)}`);
      xhr.setRequestHeader("Authorization", `Bearer ${apiKey()}`);
      xhr.setRequestHeader("X-Content-SHA256", sha);
      xhr.setRequestHeader("Content-Type", "application/octet-stream");
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) {
          setProgress(0.5 + e.loaded / e.total / 2, `Uploading: ${Math.round((e.loaded / e.total) * 100)}%`);
        }
      };
      xhr.onload = () => {
        let body = {};
        try {
          body = JSON.parse(xhr.responseText);
        } catch (_) {
          body = { detail: xhr.statusText };
        }
        if (xhr.status === 200 || xhr.status === 201) resolve(body);
        else reject(new ApiError(xhr.status, body));
      };
      xhr.onerror = () => reject(new Error("The upload was interrupted (network error)."));
      xhr.send(file);
    });
  }

  function jobOptions() {
    const options = {};
    const num = (id) => ($(id).value === "" ? null : Number($(id).value));
    if (num("opt-mpp-override") !== null) options.mpp_override = num("opt-mpp-override");
    if (num("opt-default-mpp") !== null) options.default_mpp = num("opt-default-mpp");
    if (num("opt-tissue") !== null) options.tissue_threshold = num("opt-tissue");
    return options;
  }

  async function submitJob(body) {
    const job = await apiJson("/v1/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify(body),
    });
    const requests = JSON.parse(sessionStorage.getItem(REQUESTS_STORE) || "{}");
    requests[job.id] = body;
    sessionStorage.setItem(REQUESTS_STORE, JSON.stringify(requests));
    return job;
  }

  async function onSubmit() {
    showError("submit-error", null);
    const button = $("submit-job");
    button.disabled = true;
    try {
      const body = { options: jobOptions(), priority: $("opt-priority").value };
      const tasks = [...document.querySelectorAll("input.task")];
      if (tasks.length && tasks.some((t) => !t.checked)) {
        body.tasks = tasks.filter((t) => t.checked).map((t) => t.value);
      }
      if (document.querySelector("input[name=source]:checked").value === "path") {
        body.path = $("slide-path").value.trim();
      } else {
        const file = $("slide-file").files[0];
        if (!file) throw new Error("Choose a slide file first.");
        const sha = await sha256OfFile(file);
        const uploaded = await putSlide(file, sha);
        setProgress(1, `Uploaded ${uploaded.size_bytes} bytes (sha256 ${uploaded.sha256.slice(0, 12)}…)`);
        body.slide_id = uploaded.slide_id;
      }
      await submitJob(body);
      location.hash = "#/jobs";
    } catch (err) {
      showError("submit-error", err);
    } finally {
      button.disabled = false;
    }
  }

  // -- jobs --------------------------------------------------------------------------------------
  async function pollJobs() {
    try {
      const { items } = await apiJson("/v1/jobs?limit=100");
      renderJobs(items);
      showError("jobs-error", null);
    } catch (err) {
      showError("jobs-error", err);
    }
    if (!$("jobs-view").hidden) state.pollTimer = setTimeout(pollJobs, POLL_MS);
  }

  function cell(row, content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.append(content);
    else td.textContent = content ?? "";
    row.append(td);
    return td;
  }

  function button(text, cls, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  function renderJobs(items) {
    const tbody = $("jobs-table").querySelector("tbody");
    const rows = items.map((job) => {
      const tr = document.createElement("tr");
      tr.dataset.jobId = job.id;
      tr.dataset.state = job.state;
      cell(tr, job.id);
      cell(tr, job.slide_id ? `upload ${job.slide_id.slice(0, 12)}…` : "path");
      cell(tr, job.state).className = `state state-${job.state}`;
      const { tiles_done: done, tiles_total: total } = job.progress;
      const progress = document.createElement("div");
      progress.className = "progress";
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = total ? `${Math.round((done / total) * 100)}%` : "0";
      progress.append(bar);
      const tiles = cell(tr, progress);
      tiles.className = "tiles";
      tiles.append(`${done} / ${total}`);
      cell(tr, new Date(job.created_at).toLocaleString());
      cell(tr, job.error ? `${job.error.code}: ${job.error.message}` : "").className = "job-error";
      const actions = cell(tr, "");
      if (job.state === "succeeded") {
        actions.append(button("View", "view", () => (location.hash = `#/job/${job.id}`)));
      }
      if (!FINAL.has(job.state)) {
        actions.append(button("Cancel", "cancel", () => act(() => api(`/v1/jobs/${job.id}/cancel`, { method: "POST" }))));
      }
      if (FINAL.has(job.state) && job.state !== "succeeded") {
        const again = retryBody(job);
        const b = button("Retry", "retry", () => act(() => submitJob(again)));
        if (!again) {
          b.disabled = true;
          b.title = "Submitted by path from elsewhere: submit it again from New job.";
        }
        actions.append(b);
      }
      return tr;
    });
    tbody.replaceChildren(...rows);
  }

  function retryBody(job) {
    const requests = JSON.parse(sessionStorage.getItem(REQUESTS_STORE) || "{}");
    if (requests[job.id]) return requests[job.id];
    if (!job.slide_id) return null;
    const body = { slide_id: job.slide_id, options: job.options || {}, priority: job.priority };
    if (job.tasks) body.tasks = job.tasks;
    return body;
  }

  async function act(fn) {
    try {
      await fn();
      showError("jobs-error", null);
    } catch (err) {
      showError("jobs-error", err);
    }
    clearTimeout(state.pollTimer);
    pollJobs();
  }

  // -- result ------------------------------------------------------------------------------------
  function dl(entries) {
    const list = document.createElement("dl");
    for (const [k, v] of entries) {
      if (v === undefined || v === null || v === "") continue;
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
      list.append(dt, dd);
    }
    return list;
  }

  async function openResult(jobId) {
    show("result-view");
    showError("result-error", null);
    $("result-title").textContent = `Result of ${jobId}`;
    document.body.dataset.overlayDrawn = "";
    try {
      const base = `/v1/jobs/${encodeURIComponent(jobId)}`;
      // The outline is computed on demand (a second or two): the slide opens without waiting.
      const outline = apiJson(`${base}/tissue.geojson`);
      const [result, tiles, dziText, models] = await Promise.all([
        apiJson(`${base}/result`),
        apiJson(`${base}/artifacts/tiles.geojson`),
        api(`${base}/slide.dzi`).then((r) => r.text()),
        apiJson("/v1/models").catch(() => ({ models: [] })),
      ]);
      renderPanel(jobId, result, models.models);
      openSlide(base, dziText, tiles, outline);
    } catch (err) {
      showError("result-error", err);
    }
  }

  function renderPanel(jobId, result, models) {
    const preds = $("predictions");
    preds.replaceChildren();
    for (const p of result.predictions || []) {
      const probs = Object.entries(p.probabilities)
        .map(([k, v]) => `${k} ${(v * 100).toFixed(1)}%`)
        .join(", ");
      preds.append(dl([[`${p.name} (${p.level})`, `${p.top_label} — ${probs}`]]));
    }
    const mpp = result.mpp || {};
    $("mpp").replaceChildren(
      dl([
        ["mpp (um/px)", mpp.mpp_x !== undefined ? `${mpp.mpp_x.toFixed(4)} × ${mpp.mpp_y.toFixed(4)}` : ""],
        ["source", mpp.source],
        ["detail", mpp.detail],
        ["target mpp", result.tiles && result.tiles.target_mpp],
        ["level read", result.level && `${result.level.level} (${result.level.level_mpp.toFixed(3)} um/px)`],
        ["warnings", (mpp.warnings || []).join(" ")],
      ]),
    );
    const qc = result.qc || {};
    $("qc").replaceChildren(
      dl([
        ["tiles kept", `${qc.tiles_kept} of ${qc.tiles_total}`],
        ["tissue", qc.tissue_area_mm2 !== undefined ? `${qc.tissue_area_mm2.toFixed(2)} mm²` : ""],
        ["modality", qc.modality],
        ["warnings", (qc.warnings || []).join(" ")],
      ]),
    );
    const model = result.model || {};
    const card = (models.find((m) => m.card && m.card.name === model.name) || {}).card || {};
    $("model-card").replaceChildren(
      dl([
        ["name", `${model.name} ${model.version}`],
        ["trained", model.trained],
        ["architecture", model.architecture],
        ["description", card.description],
        ["intended use", card.intended_use],
        ["license", card.license],
      ]),
    );
    for (const b of document.querySelectorAll("#downloads button")) {
      b.onclick = () => download(jobId, b.dataset.artifact);
    }
  }

  async function download(jobId, name) {
    try {
      const path = name === "result.json" ? `/v1/jobs/${jobId}/result` : `/v1/jobs/${jobId}/artifacts/${name}`;
      const blob = await (await api(path)).blob();
      const url = URL.createObjectURL(blob);
      const a = document.createElement("a");
      a.href = url;
      a.download = `${jobId}-${name}`;
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
    } catch (err) {
      showError("result-error", err);
    }
  }

  function dziSource(base, dziText) {
    const xml = new DOMParser().parseFromString(dziText, "application/xml");
    const image = xml.documentElement;
    const size = image.getElementsByTagName("Size")[0];
    return {
      Image: {
        xmlns: "http://schemas.microsoft.com/deepzoom/2008",
        Url: `${base}/slide_files/`,
        Format: image.getAttribute("Format"),
        Overlap: image.getAttribute("Overlap"),
        TileSize: image.getAttribute("TileSize"),
        Size: { Width: size.getAttribute("Width"), Height: size.getAttribute("Height") },
      },
    };
  }

  function openSlide(base, dziText, tiles, outlinePromise) {
    if (state.viewer) state.viewer.destroy();
    $("osd").querySelectorAll(".openseadragon-container").forEach((e) => e.remove());
    const viewer = OpenSeadragon({
      element: $("osd"),
      prefixUrl: "vendor/openseadragon-images/",
      tileSources: dziSource(base, dziText),
      loadTilesWithAjax: true,
      ajaxHeaders: { Authorization: `Bearer ${apiKey()}` },
      drawer: "canvas",
      showNavigator: true,
      crossOriginPolicy: false,
      animationTime: 0.3,
    });
    state.viewer = viewer;
    const outline = { features: [], loaded: false };
    state.overlay = makeOverlay(viewer, tiles, outline);
    // data-overlay-drawn="1" once the slide's visible tiles and the whole overlay are drawn.
    let slideLoaded = false;
    const markDrawn = () => {
      state.overlay.draw();
      if (slideLoaded && outline.loaded) document.body.dataset.overlayDrawn = "1";
    };
    outlinePromise
      .then((doc) => {
        outline.features = doc.features;
        outline.loaded = true;
        markDrawn();
      })
      .catch((err) => showError("result-error", err));
    viewer.addHandler("open", () => {
      const item = viewer.world.getItemAt(0);
      const loaded = () => {
        slideLoaded = true;
        markDrawn();
      };
      if (item.getFullyLoaded()) loaded();
      item.addHandler("fully-loaded-change", (e) => {
        if (e.fullyLoaded) loaded();
      });
    });
    for (const ev of ["update-viewport", "animation", "resize", "open"]) {
      viewer.addHandler(ev, () => state.overlay.draw());
    }
  }

  // -- overlay: tissue outline and tiles coloured by a head ---------------------------------------
  const VIRIDIS = [
    [68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37],
  ];

  function colour(t) {
    const x = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i;
    const c = VIRIDIS[i].map((v, k) => Math.round(v + (VIRIDIS[i + 1][k] - v) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function measurementNames(tiles) {
    const names = new Set();
    for (const f of tiles.features) for (const k of Object.keys(f.properties.measurements || {})) names.add(k);
    // Slide-head attention first: it is what the slide prediction looked at.
    return [...names].sort((a, b) => (b.endsWith(": attention") - a.endsWith(": attention")) || a.localeCompare(b));
  }

  function makeOverlay(viewer, tiles, outline) {
    const canvas = $("overlay");
    const select = $("colour-by");
    const names = measurementNames(tiles);
    select.replaceChildren(
      ...names.map((n) => {
        const o = document.createElement("option");
        o.value = n;
        o.textContent = n.endsWith(": attention")
          ? `${n} (slide-head attention)`
          : `${n} (tile-head probability)`;
        return o;
      }),
    );
    const overlay = { names, range: [0, 1] };

    function values() {
      const name = select.value;
      const vals = tiles.features.map((f) => (f.properties.measurements || {})[name]);
      const finite = vals.filter((v) => Number.isFinite(v));
      const lo = finite.length ? Math.min(...finite) : 0;
      const hi = finite.length ? Math.max(...finite) : 1;
      overlay.range = [lo, hi];
      return vals.map((v) => (Number.isFinite(v) ? (hi > lo ? (v - lo) / (hi - lo) : 1) : null));
    }

    function drawColourbar() {
      const bar = $("colourbar-canvas");
      const ctx = bar.getContext("2d");
      for (let x = 0; x < bar.width; x++) {
        ctx.fillStyle = colour(x / (bar.width - 1));
        ctx.fillRect(x, 0, 1, bar.height);
      }
      const name = select.value;
      $("colourbar-title").textContent = name
        ? `Tile colour: ${select.selectedOptions[0].textContent}`
        : "Tile colour: no per-tile values in tiles.geojson";
      $("colourbar-min").textContent = overlay.range[0].toPrecision(3);
      $("colourbar-max").textContent = overlay.range[1].toPrecision(3);
    }

    overlay.draw = () => {
      const rect = canvas.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      const w = Math.round(rect.width * dpr);
      const h = Math.round(rect.height * dpr);
      if (canvas.width !== w || canvas.height !== h) {
        canvas.width = w;
        canvas.height = h;
      }
      const ctx = canvas.getContext("2d");
      ctx.clearRect(0, 0, w, h);
      if (!viewer.world.getItemCount()) return;
      // Level-0 image pixels -> canvas pixels is a scale and a shift (no rotation).
      const vp = viewer.viewport;
      const p0 = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
      const p1 = vp.imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 1000));
      const sx = ((p1.x - p0.x) / 1000) * dpr;
      const sy = ((p1.y - p0.y) / 1000) * dpr;
      const ox = p0.x * dpr;
      const oy = p0.y * dpr;
      const alpha = Number($("opacity").value) / 100;
      if ($("show-tiles").checked && select.value) {
        const vals = values();
        ctx.globalAlpha = alpha;
        tiles.features.forEach((f, i) => {
          if (vals[i] === null) return;
          const ring = f.geometry.coordinates[0];
          const xs = ring.map((p) => p[0]);
          const ys = ring.map((p) => p[1]);
          const x0 = Math.min(...xs) * sx + ox;
          const y0 = Math.min(...ys) * sy + oy;
          ctx.fillStyle = colour(vals[i]);
          ctx.fillRect(x0, y0, (Math.max(...xs) - Math.min(...xs)) * sx, (Math.max(...ys) - Math.min(...ys)) * sy);
        });
        ctx.globalAlpha = Math.min(1, alpha + 0.3);
        ctx.strokeStyle = "rgba(255,255,255,0.9)";
        ctx.lineWidth = 1 * dpr;
        for (const f of tiles.features) {
          const ring = f.geometry.coordinates[0];
          ctx.beginPath();
          ring.forEach((p, k) => (k ? ctx.lineTo(p[0] * sx + ox, p[1] * sy + oy) : ctx.moveTo(p[0] * sx + ox, p[1] * sy + oy)));
          ctx.stroke();
        }
      }
      if ($("show-outline").checked) {
        ctx.globalAlpha = Math.max(0.2, alpha);
        ctx.strokeStyle = "#00c853";
        ctx.lineWidth = 2.5 * dpr;
        for (const f of outline.features) {
          for (const ring of f.geometry.coordinates) {
            ctx.beginPath();
            ring.forEach((p, k) => (k ? ctx.lineTo(p[0] * sx + ox, p[1] * sy + oy) : ctx.moveTo(p[0] * sx + ox, p[1] * sy + oy)));
            ctx.stroke();
          }
        }
      }
      ctx.globalAlpha = 1;
      drawColourbar();
    };

    for (const id of ["show-outline", "show-tiles", "colour-by", "opacity"]) {
      $(id).oninput = () => overlay.draw();
      $(id).onchange = () => overlay.draw();
    }
    return overlay;
  }

  // -- wiring ------------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (e) => {
      signIn(e).catch((err) => showError("login-error", err));
    });
    $("signout").addEventListener("click", () => signOut());
    $("submit-job").addEventListener("click", onSubmit);
    for (const radio of document.querySelectorAll("input[name=source]")) {
      radio.addEventListener("change", () => {
        const path = radio.value === "path" && radio.checked;
        $("path-box").hidden = !path;
        $("upload-box").hidden = path;
        $("submit-job").textContent = path ? "Submit" : "Upload and submit";
      });
    }
    window.addEventListener("hashchange", route);
    route();
  });
})();
