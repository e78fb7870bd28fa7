// A slider whose every step is already drawn: the server sends one view (cards + a plotly figure) for each
// value, as a base view and per-step patches, and a move shows its view at once (Plotly.react on the same
// div) instead of waiting for a rerun. The chosen value goes back to Python after the moves settle.
// plotly.js is the Python plotly package's own bundle, served once from the app's static folder.
const REPORT_AFTER_MS = 250;

function loadPlotly(src) {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  if (!window.__pruningExplorerPlotly) {
    window.__pruningExplorerPlotly = new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = src;
      script.onload = () => resolve(window.Plotly);
      script.onerror = () => { window.__pruningExplorerPlotly = null; reject(new Error(src)); };
      document.head.appendChild(script);
    });
  }
  return window.__pruningExplorerPlotly;
}

function applyPatch(base, patch) {
  const view = structuredClone(base);
  for (const [path, value] of patch) {
    let target = view;
    for (const key of path.slice(0, -1)) target = target[key];
    target[path[path.length - 1]] = value;
  }
  return view;
}

function markdownLine(text) {  // the subset our messages use: **bold** and `code`, everything else as text
  const escaped = text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
  return escaped.replace(/\*\*(.+?)\*\*/g, "<strong>$1</strong>").replace(/`(.+?)`/g, "<code>$1</code>");
}

function drawCards(cards, items) {
  if (cards.children.length !== items.length) {
    cards.replaceChildren(...items.map(() => {
      const card = document.createElement("div");
      card.className = "pe-card";
      for (const part of ["pe-label", "pe-value", "pe-note"]) {
        const element = document.createElement("div");
        element.className = part;
        card.appendChild(element);
      }
      return card;
    }));
  }
  items.forEach((item, index) => {
    const [label, value, note] = cards.children[index].children;
    label.textContent = item.label;
    value.textContent = item.value;
    cards.children[index].title = item.help || "";  // the exact figure behind a shortened value
    note.textContent = item.note || "";
  });
}

function themed(root, layout) {
  const style = getComputedStyle(root);
  const out = Object.assign({}, layout, {
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    modebar: { bgcolor: "rgba(0,0,0,0)", color: "rgba(128,128,128,0.7)", activecolor: style.color },
    font: Object.assign({ family: style.fontFamily, color: style.color }, layout.font || {}),
  });
  // lines drawn without a colour (the requested sparsity) take the page's ink, as in a dark theme
  out.shapes = (layout.shapes || []).map((shape) => (shape.line && shape.line.color) ? shape
    : Object.assign({}, shape, { line: Object.assign({}, shape.line || {}, { color: style.color }) }));
  for (const axis of ["xaxis", "yaxis"]) {
    out[axis] = Object.assign({ gridcolor: "rgba(128,128,128,0.2)", zerolinecolor: "rgba(128,128,128,0.4)" },
                              layout[axis] || {});
  }
  return out;
}

export default function ({ parentElement, data, setStateValue }) {
  const root = parentElement.querySelector(".pe-live");
  const input = root.querySelector("input");
  const shown = root.querySelector(".pe-shown");
  const chart = root.querySelector(".pe-chart");
  const state = root.__peState || (root.__peState = { version: null, serverIndex: null, reported: null, timer: null });

  const show = (index) => {
    state.shown = `${data.version}:${index}`;
    const view = applyPatch(data.base, data.patches[index]);
    shown.textContent = data.labels[index];
    input.setAttribute("aria-valuetext", data.labels[index]);
    const warning = root.querySelector(".pe-warning");
    warning.innerHTML = view.warning ? markdownLine(view.warning) : "";
    warning.hidden = !view.warning;
    root.querySelector(".pe-plan-note").textContent = view.note || "";
    drawCards(root.querySelector(".pe-cards"), view.cards);
    loadPlotly(data.src)
      .then((Plotly) => Plotly.react(chart, view.figure.data, themed(root, view.figure.layout),
                                     { displaylogo: false, responsive: true }))
      .catch((error) => { chart.textContent = `The chart could not load plotly.js (${error.message}): reload the page.`; });
  };
  const report = () => {
    clearTimeout(state.timer);
    state.timer = null;
    const index = Number(input.value);
    if (index === state.reported) return;
    state.reported = index;
    setStateValue("value", data.values[index]);
  };

  input.setAttribute("aria-label", data.label);
  root.querySelector(".pe-slider-label").textContent = data.label;
  input.max = String(data.values.length - 1);
  input.disabled = Boolean(data.disabled);
  input.style.display = shown.style.display = data.values.length === 1 ? "none" : "";  // one value (N:M): the label says it
  root.title = data.help || "";
  // Settings changed (new views), or the server moved the value itself: show its value. Otherwise this
  // rerun answers a value reported earlier, and the slider keeps where the user has moved it since.
  if (data.version !== state.version || (data.index !== state.serverIndex && data.index !== state.reported)) {
    input.value = String(data.index);
    state.reported = data.index;
  }
  state.version = data.version;
  state.serverIndex = data.index;
  state.show = show;
  state.report = report;
  if (!state.bound) {  // bound once; they call this render's show / report through the state
    state.bound = true;
    input.addEventListener("input", () => {
      state.show(Number(input.value));
      clearTimeout(state.timer);
      state.timer = setTimeout(() => state.report(), REPORT_AFTER_MS);
    });
    input.addEventListener("pointerup", () => state.report());  // a drag ends
    input.addEventListener("blur", () => state.report());    // e.g. on the way to the Apply button
  }
  if (state.shown !== `${data.version}:${input.value}`) show(Number(input.value));
}
