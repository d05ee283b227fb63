// pconv mask board: paint a hole on a photo, send photo + mask to /api/inpaint, show the
// results. Vanilla JavaScript, no build step, nothing loaded from outside this server.
//
// The strokes canvas has the photo's own pixel size (the page scales it with CSS), so the
// mask is painted in image pixels. Strokes are kept as vector data and redrawn on undo:
// snapshots of a 4096x4096 canvas would cost 64 MB each.
// Mask sent to the server: white = known, black = hole (the project's mask file format).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const body = document.body;
  const maxBytes = Number(body.dataset.maxBytes);
  const maxSide = Number(body.dataset.maxSide);
  const limitText = body.dataset.limitText;

  const fileInput = $("file");
  const sizeInput = $("size");
  const sizeValue = $("size-value");
  const brushButton = $("brush");
  const eraserButton = $("eraser");
  const undoButton = $("undo");
  const clearButton = $("clear");
  const inpaintButton = $("inpaint");
  const statusLine = $("status");
  const errorBox = $("error");
  const stage = $("stage");
  const photo = $("photo");
  const strokesCanvas = $("strokes");
  const cursor = $("cursor");
  const results = $("results");
  const download = $("download");
  const photoCtx = photo.getContext("2d");
  const strokesCtx = strokesCanvas.getContext("2d", { willReadFrequently: true });

  const STROKE_COLOUR = "rgb(255, 0, 110)";
  let file = null;           // the chosen File, uploaded as is (no re-encoding)
  let strokes = [];          // {mode: "paint" | "erase" | "clear", width, points: [[x, y], ...]}
  let current = null;        // the stroke being drawn
  let mode = "paint";
  let busy = false;
  let resultUrls = [];

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function clearError() {
    errorBox.hidden = true;
    errorBox.textContent = "";
  }

  function setStatus(message) {
    statusLine.textContent = message;
  }

  function updateButtons() {
    const ready = file !== null && !busy;
    undoButton.disabled = !ready || strokes.length === 0;
    clearButton.disabled = !ready || strokes.length === 0;
    inpaintButton.disabled = !ready;
    fileInput.disabled = busy;
  }

  function setMode(next) {
    mode = next;
    brushButton.setAttribute("aria-pressed", String(next === "paint"));
    eraserButton.setAttribute("aria-pressed", String(next === "erase"));
  }

  // Canvas pixels per CSS pixel: the brush size is given in screen pixels, so it looks the
  // same whatever the photo's resolution.
  function scale() {
    const rect = strokesCanvas.getBoundingClientRect();
    return rect.width > 0 ? strokesCanvas.width / rect.width : 1;
  }

  function brushWidth() {
    return Number(sizeInput.value) * scale();
  }

  function toCanvas(event) {
    const rect = strokesCanvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * (strokesCanvas.width / rect.width),
            (event.clientY - rect.top) * (strokesCanvas.height / rect.height)];
  }

  function styleFor(stroke) {
    strokesCtx.globalCompositeOperation = stroke.mode === "erase" ? "destination-out" : "source-over";
    strokesCtx.strokeStyle = STROKE_COLOUR;
    strokesCtx.fillStyle = STROKE_COLOUR;
    strokesCtx.lineWidth = stroke.width;
    strokesCtx.lineCap = "round";
    strokesCtx.lineJoin = "round";
  }

  function drawDot(stroke, [x, y]) {
    styleFor(stroke);
    strokesCtx.beginPath();
    strokesCtx.arc(x, y, stroke.width / 2, 0, 2 * Math.PI);
    strokesCtx.fill();
  }

  function drawSegment(stroke, [x0, y0], [x1, y1]) {
    styleFor(stroke);
    strokesCtx.beginPath();
    strokesCtx.moveTo(x0, y0);
    strokesCtx.lineTo(x1, y1);
    strokesCtx.stroke();
  }

  function drawStroke(stroke) {
    if (stroke.mode === "clear") {
      strokesCtx.clearRect(0, 0, strokesCanvas.width, strokesCanvas.height);
      return;
    }
    drawDot(stroke, stroke.points[0]);
    if (stroke.points.length > 1) {
      styleFor(stroke);
      strokesCtx.beginPath();
      strokesCtx.moveTo(...stroke.points[0]);
      for (const p of stroke.points.slice(1)) strokesCtx.lineTo(...p);
      strokesCtx.stroke();
    }
  }

  function redraw() {
    strokesCtx.clearRect(0, 0, strokesCanvas.width, strokesCanvas.height);
    for (const stroke of strokes) drawStroke(stroke);
  }

  function moveCursor(event) {
    const rect = strokesCanvas.getBoundingClientRect();
    const d = Number(sizeInput.value);
    cursor.style.width = `${d}px`;
    cursor.style.height = `${d}px`;
    cursor.style.left = `${event.clientX - rect.left}px`;
    cursor.style.top = `${event.clientY - rect.top}px`;
    cursor.hidden = false;
  }

  strokesCanvas.addEventListener("pointerdown", (event) => {
    if (file === null || busy || event.button !== 0) return;
    event.preventDefault();
    strokesCanvas.setPointerCapture(event.pointerId);
    const point = toCanvas(event);
    current = { mode, width: brushWidth(), points: [point] };
    strokes.push(current);
    drawDot(current, point);
    updateButtons();
  });

  strokesCanvas.addEventListener("pointermove", (event) => {
    moveCursor(event);
    if (current === null) return;
    const point = toCanvas(event);
    const last = current.points[current.points.length - 1];
    current.points.push(point);
    drawSegment(current, last, point);
  });

  const endStroke = () => { current = null; };
  strokesCanvas.addEventListener("pointerup", endStroke);
  strokesCanvas.addEventListener("pointercancel", endStroke);
  strokesCanvas.addEventListener("pointerleave", () => { cursor.hidden = true; });

  sizeInput.addEventListener("input", () => { sizeValue.textContent = sizeInput.value; });
  brushButton.addEventListener("click", () => setMode("paint"));
  eraserButton.addEventListener("click", () => setMode("erase"));

  function undo() {
    if (strokes.length === 0 || busy) return;
    strokes.pop();
    redraw();
    updateButtons();
  }
  undoButton.addEventListener("click", undo);
  document.addEventListener("keydown", (event) => {
    if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "z") {
      event.preventDefault();
      undo();
    }
  });

  // Clear is itself a stroke, so it can be undone like one.
  clearButton.addEventListener("click", () => {
    if (strokes.length === 0) return;
    strokes.push({ mode: "clear", width: 0, points: [] });
    redraw();
    updateButtons();
  });

  fileInput.addEventListener("change", async () => {
    clearError();
    const chosen = fileInput.files[0];
    if (!chosen) return;
    if (chosen.size > maxBytes) {
      showError(`${chosen.name} is ${(chosen.size / 2 ** 20).toFixed(1)} MB; the limit is ${limitText}.`);
      return;
    }
    const url = URL.createObjectURL(chosen);
    const img = new Image();
    img.src = url;
    try {
      await img.decode();
    } catch (err) {
      URL.revokeObjectURL(url);
      showError(`${chosen.name} is not an image this browser can read.`);
      return;
    }
    if (img.naturalWidth > maxSide || img.naturalHeight > maxSide) {
      URL.revokeObjectURL(url);
      showError(`${chosen.name} is ${img.naturalWidth}x${img.naturalHeight} pixels; the limit is ${maxSide}x${maxSide}.`);
      return;
    }
    file = chosen;
    photo.width = strokesCanvas.width = img.naturalWidth;
    photo.height = strokesCanvas.height = img.naturalHeight;
    photoCtx.drawImage(img, 0, 0);
    URL.revokeObjectURL(url);
    strokes = [];
    redraw();
    stage.hidden = false;
    results.hidden = true;
    setStatus(`${file.name}: ${img.naturalWidth}x${img.naturalHeight}. Paint over what should go.`);
    updateButtons();
  });

  // The mask in the photo's pixel size: black where the strokes canvas is painted (alpha
  // at least one half, the same threshold the server uses), white elsewhere.
  async function maskBlob() {
    const w = strokesCanvas.width;
    const h = strokesCanvas.height;
    const painted = strokesCtx.getImageData(0, 0, w, h).data;
    const out = new ImageData(w, h);
    const px = out.data;
    let holes = 0;
    for (let i = 0; i < painted.length; i += 4) {
      const hole = painted[i + 3] >= 128;
      const v = hole ? 0 : 255;
      px[i] = v; px[i + 1] = v; px[i + 2] = v; px[i + 3] = 255;
      holes += hole ? 1 : 0;
    }
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.getContext("2d").putImageData(out, 0, 0);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    return { blob, holes };
  }

  function base64ToBlob(b64, type) {
    const bytes = atob(b64);
    const array = new Uint8Array(bytes.length);
    for (let i = 0; i < bytes.length; i++) array[i] = bytes.charCodeAt(i);
    return new Blob([array], { type });
  }

  function showResults(data) {
    for (const url of resultUrls) URL.revokeObjectURL(url);
    resultUrls = [];
    for (const method of ["pconv", "ns", "telea"]) {
      const url = URL.createObjectURL(base64ToBlob(data.images[method], "image/png"));
      resultUrls.push(url);
      $(`result-${method}`).src = url;
      $(`time-${method}`).textContent = `${data.seconds[method].toFixed(2)} s`;
    }
    download.href = resultUrls[0];
    download.download = `${file.name.replace(/\.[^.]*$/, "")}_inpainted.png`;
    results.hidden = false;
  }

  inpaintButton.addEventListener("click", async () => {
    if (file === null || busy) return;
    clearError();
    const { blob, holes } = await maskBlob();
    if (holes === 0) {
      showError("Paint over the part to fill first.");
      return;
    }
    // The server caps the whole request; saying so here beats a dropped connection.
    if (file.size + blob.size > maxBytes) {
      showError(`The photo and its mask come to ${((file.size + blob.size) / 2 ** 20).toFixed(1)} MB; the limit is ${limitText}.`);
      return;
    }
    const form = new FormData();
    form.append("image", file, file.name);
    form.append("mask", blob, "mask.png");
    busy = true;
    updateButtons();
    setStatus("Inpainting...");
    try {
      const response = await fetch("api/inpaint", { method: "POST", body: form });
      let data = null;
      try {
        data = await response.json();
      } catch (err) {
        data = null;
      }
      if (!response.ok || data === null) {
        const reason = data && data.error ? data.error : `the server answered HTTP ${response.status}`;
        throw new Error(reason);
      }
      showResults(data);
      setStatus(`Done: ${data.hole_percent}% of the pixels filled.`);
    } catch (err) {
      showError(`Inpainting failed: ${err.message}`);
      setStatus("");
    } finally {
      busy = false;
      updateButtons();
    }
  });

  updateButtons();
})();
