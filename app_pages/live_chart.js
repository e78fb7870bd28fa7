// A plotly figure redrawn in place: Plotly.react on the same div keeps the chart mounted across reruns,
// where st.plotly_chart puts a new chart (Plotly.newPlot) on the page whenever the figure changes.
// plotly.js is the Python plotly package's own bundle, served once from the app's static folder.
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

export default function ({ parentElement, data }) {
  const root = parentElement.querySelector(".pe-live");
  const cards = root.querySelector(".pe-cards");
  const chart = root.querySelector(".pe-chart");
  const items = data.cards || [];
  if (cards.children.length !== items.length) {
    cards.replaceChildren(...items.map(() => {
      const card = document.createElement("div");
      card.className = "pe-card";
      card.setAttribute("data-testid", "peCard");
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
    note.textContent = item.note || "";
  });
  const figure = data.figure;
  const ink = getComputedStyle(root).color;
  const layout = Object.assign({}, figure.layout, {
    template: undefined, paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    font: Object.assign({ family: getComputedStyle(root).fontFamily, color: ink }, figure.layout.font || {}),
  });
  for (const axis of ["xaxis", "yaxis"]) {
    layout[axis] = Object.assign({ gridcolor: "rgba(128,128,128,0.2)", zerolinecolor: "rgba(128,128,128,0.4)" },
                                 layout[axis] || {});
  }
  loadPlotly(data.src)
    .then((Plotly) => Plotly.react(chart, figure.data, layout, { displaylogo: false, responsive: true }))
    .catch((error) => { chart.textContent = `The chart could not load plotly.js (${error.message}): reload the page.`; });
}
