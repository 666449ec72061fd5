// The page's behaviour: send the form as JSON, follow the job's progress, show the images or the error.
"use strict";
const form = document.getElementById("form");
const byId = (id) => document.getElementById(id);

// Reference images chosen from this page's results ("use as reference"), by their /files/ URL.
const resultReferences = [];

function readUpload(file) {
  // An uploaded picture as {name, data}: its bytes in base64 (the part after "base64," of a data URL).
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({name: file.name, data: reader.result.split(",", 2)[1] || ""});
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function formValues() {
  const values = {
    prompt: byId("prompt").value,
    per_image: byId("per-image").checked,
    groups: [...form.querySelectorAll("input[name=groups]:checked")].map((box) => box.value),
  };
  for (const input of form.querySelectorAll("[data-flag]")) {
    if (input.type === "file") {
      const uploads = await Promise.all([...input.files].map(readUpload));
      values[input.dataset.flag] = [...uploads, ...resultReferences.map((url) => ({url}))];
    } else {
      values[input.dataset.flag] = input.type === "checkbox" ? input.checked : input.value;
    }
  }
  return values;
}

function showChosenReferences() {
  const chosen = byId("references-chosen");
  if (chosen) chosen.textContent = resultReferences.length ? `+ ${resultReferences.length} of this page's images` : "";
}

function showError(line) {
  byId("error").textContent = line;
  byId("error").hidden = !line;
}

function element(tag, properties, children = []) {
  const node = Object.assign(document.createElement(tag), properties);
  node.append(...children);
  return node;
}

function showResult(result) {
  // One column per image of the batch, captioned with its prompt; one row per variant.
  const columns = result.rows[result.rows.length - 1].images;  // the generated images (a reference row may come first)
  const header = element("tr", {}, [element("th"), ...columns.map((image) =>
    element("th", {className: "caption", textContent: `${image.prompt} (seed ${image.seed})`}))]);
  const rows = result.rows.map((row) => element("tr", {className: "grid-row"}, [
    element("th", {className: "row", textContent: row.label}),
    ...row.images.map((image) => element("td", {}, [
      element("a", {href: image.url, download: "", title: "download this PNG"}, [
        element("img", {src: image.url, alt: image.prompt})]),
      element("button", {type: "button", className: "use", textContent: "use as reference",
                         onclick: () => { resultReferences.push(image.url); showChosenReferences(); }})]))]));
  byId("grid").replaceChildren(header, ...rows);
  byId("grid-link").href = result.grid;
  byId("command").textContent = result.command;
  byId("settings").textContent = result.settings;
  byId("result").hidden = false;
}

async function follow(job) {
  for (;;) {
    const status = await (await fetch("/status/" + job)).json();
    if (status.total) {
      byId("progress").max = status.total;
      byId("progress").value = status.done;
      byId("progress-text").textContent = `${status.done} / ${status.total} steps`;
    }
    if (status.state === "error" || status.state === "cancelled") return showError(status.error);
    if (status.state === "done") return showResult(status.result);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

function post(path, values) {
  return fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(values)});
}

let runningJob = null;

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  byId("generate").disabled = true;
  byId("progress").value = 0;
  byId("progress-text").textContent = "";
  try {
    const answer = await (await post("/generate", await formValues())).json();
    if (answer.error) return showError(answer.error);
    runningJob = answer.job;
    byId("cancel").hidden = false;
    await follow(answer.job);
  } catch (error) {
    showError(`error: the page cannot reach its server (${error})`);
  } finally {
    runningJob = null;
    byId("cancel").hidden = true;
    byId("generate").disabled = false;
  }
});

byId("cancel").addEventListener("click", async () => {
  if (runningJob) await post("/cancel/" + runningJob, {});
});

byId("per-image").addEventListener("change", () => {
  byId("field-n_samples").disabled = byId("per-image").checked;  // one image per prompt line
});
