"use strict";

// The page talks to the same service that served it: POST predict?heatmap=true, GET model.
(function () {
  const $ = (id) => document.getElementById(id);
  const pct = (p) => (100 * p).toFixed(1) + "%";
  // Enough decimals that a score and the threshold never print the same beside "<" or "≥".
  function pctPair(p, t) {
    let d = 1;
    while (d < 6 && (100 * p).toFixed(d) === (100 * t).toFixed(d)) d += 1;
    return [(100 * p).toFixed(d) + "%", (100 * t).toFixed(d) + "%"];
  }

  function show(el, on) { el.hidden = !on; }

  function setError(message) {
    $("error").textContent = message;
    show($("error"), Boolean(message));
  }

  function render(r) {
    // `probability` is the calibrated P(PNEUMONIA) for every answer; the label is the
    // threshold's verdict on it.
    const pPneumonia = r.probability;
    const [pShown, tShown] = pctPair(pPneumonia, r.threshold);
    const verdict = "P(PNEUMONIA) " + pShown + (pPneumonia >= r.threshold ? " ≥ " : " < ") +
      "threshold " + tShown;
    // The input check: a film unlike the training films (or, when the service only flags, an
    // image that is not a chest X-ray) gets an answer the model was never validated for. It
    // reads as such: no confident label, the reason first.
    const check = r.input_check;
    const unvalidated = Boolean(check && check.outcome !== "typical");
    const label = $("label");
    label.textContent = unvalidated ? "Unvalidated: " + r.prediction : r.prediction;
    label.className = "label " + (unvalidated ? "unvalidated" : r.prediction);
    $("probability").textContent = unvalidated
      ? "Not a validated result: the model was not validated on images like this one. " +
        "Model output only: " + verdict
      : verdict;
    $("meter-fill").style.width = pct(pPneumonia);
    $("meter-threshold").style.left = pct(r.threshold);
    $("threshold-text").textContent = "threshold " + pct(r.threshold);
    $("p-normal").textContent = pct(r.probabilities.NORMAL);
    $("p-pneumonia").textContent = pct(pPneumonia);
    const warning = $("input-warning");
    if (unvalidated) {
      const score = check.score === null || check.score === undefined ? "" : " (score " + check.score.toFixed(2) + ")";
      warning.textContent = "Warning: " + check.message + score + ".";
      show(warning, true);
    } else {
      warning.textContent = "";
      show(warning, false);
    }
    const img = $("heatmap");
    if (r.heatmap_png) {
      img.src = "data:image/png;base64," + r.heatmap_png;
      show(img, true);
      $("heatmap-caption").textContent =
        "Heatmap: regions that pushed the model toward " + r.prediction +
        " (class activation map, brighter = stronger). It shows where the model looked, not a finding.";
    } else {
      show(img, false);
      $("heatmap-caption").textContent = "";
    }
    $("meta").textContent =
      r.model.name + " " + r.model.version + " · weights " + r.model.weights_sha256.slice(0, 12) +
      " · " + r.processing_ms.toFixed(0) + " ms · request " + r.request_id;
    show($("result"), true);
  }

  async function predict(file) {
    setError("");
    $("filename").textContent = file.name + " (" + (file.size / 1024).toFixed(0) + " KB)";
    show($("filename"), true);
    $("status").textContent = "Analysing…";
    const form = new FormData();
    form.append("file", file, file.name);
    const headers = {};
    const key = $("api-key").value.trim();
    if (key) headers["X-API-Key"] = key;
    try {
      const resp = await fetch("predict?heatmap=true", { method: "POST", body: form, headers });
      let body = null;
      try { body = await resp.json(); } catch (_) { body = null; }
      if (!resp.ok) {
        const msg = body && body.error ? body.error.message : "the service answered " + resp.status;
        setError("Could not analyse this image: " + msg);
        if (resp.status === 401) document.querySelector("details.key").open = true;
        show($("result"), false);
        $("status").textContent = "";
        return;
      }
      render(body);
      $("status").textContent = "Done.";
    } catch (err) {
      setError("Could not reach the service; check your connection and try again.");
      $("status").textContent = "";
    }
  }

  async function loadCard() {
    try {
      const resp = await fetch("model");
      if (!resp.ok) return;
      const card = await resp.json();
      if (card.intended_use) $("intended-use").textContent = card.intended_use;
      const list = $("limitations");
      list.textContent = "";
      for (const item of card.limitations || []) {
        const li = document.createElement("li");
        li.textContent = item;
        list.appendChild(li);
      }
      $("model-info").textContent =
        "Model " + card.name + " " + card.version + " · sha256 " + String(card.sha256).slice(0, 12) +
        " · operating threshold " + pct(card.threshold);
    } catch (_) { /* the static text stays */ }
  }

  document.addEventListener("DOMContentLoaded", () => {
    const input = $("file");
    const drop = $("drop");
    input.addEventListener("change", () => { if (input.files.length) predict(input.files[0]); });
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
      e.preventDefault(); drop.classList.add("dragging");
    }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
      e.preventDefault(); drop.classList.remove("dragging");
    }));
    drop.addEventListener("drop", (e) => {
      const files = e.dataTransfer && e.dataTransfer.files;
      if (files && files.length) predict(files[0]);
    });
    loadCard();
  });
})();
