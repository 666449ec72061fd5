// The page's behaviour: send the form as JSON, follow the job's progress, show the images or the error.
"use strict";
const form = document.getElementById("form");
const byId = (id) => document.getElementById(id);

function formValues() {
  const values = {
    prompt: byId("prompt").value,
    per_image: byId("per-image").checked,
    groups: [...form.querySelectorAll("input[name=groups]:checked")].map((box) => box.value),
  };
  for (const input of form.querySelectorAll("[data-flag]")) {
    values[input.dataset.flag] = input.type === "checkbox" ? input.checked : input.value;
  }
  return values;
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
  const columns = result.rows[0].images;
  const header = element("tr", {}, [element("th"), ...columns.map((image) =>
    element("th", {className: "caption", textContent: `${image.prompt} (seed ${image.seed})`}))]);
  const rows = result.rows.map((row) => element("tr", {className: "grid-row"}, [
    element("th", {className: "row", textContent: row.label}),
    ...row.images.map((image) => element("td", {}, [
      element("a", {href: image.url, download: "", title: "download this PNG"}, [
        element("img", {src: image.url, alt: image.prompt})])]))]));
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
    if (status.state === "error") return showError(status.error);
    if (status.state === "done") return showResult(status.result);
    await new Promise((resolve) => setTimeout(resolve, 200));
  }
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  byId("generate").disabled = true;
  byId("progress").value = 0;
  byId("progress-text").textContent = "";
  try {
    const response = await fetch("/generate", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(formValues())});
    const answer = await response.json();
    if (answer.error) showError(answer.error);
    else await follow(answer.job);
  } catch (error) {
    showError(`error: the page cannot reach its server (${error})`);
  } finally {
    byId("generate").disabled = false;
  }
});

byId("per-image").addEventListener("change", () => {
  byId("field-n_samples").disabled = byId("per-image").checked;  // one image per prompt line
});
