// latentstore dashboard: renders the data files written by `latentstore dashboard`.
// Data arrive as scripts that call LS.receive(key, data), so the site also works from file://,
// where browsers refuse fetch(). Text from the data only ever enters the page through
// textContent and element properties, never as HTML, so any token is shown as typed.
"use strict";

const LS = (() => {
  const received = new Map();
  const waiting = new Map();
  const PER_FOLDER = 1000; // as jobs/dashboard.py writes them

  function receive(key, data) {
    received.set(key, data);
    const resolve = waiting.get(key);
    if (resolve) {
      waiting.delete(key);
      resolve(data);
    }
  }

  function load(kind, number) {
    const key = `${kind}/${number}`;
    if (received.has(key)) return Promise.resolve(received.get(key));
    return new Promise((resolve, reject) => {
      waiting.set(key, resolve);
      const script = document.createElement("script");
      script.src = `data/${kind}/${Math.floor(number / PER_FOLDER)}/${number}.js`;
      script.onload = () => script.remove();
      script.onerror = () => {
        waiting.delete(key);
        script.remove();
        reject(new Error(`no data file for ${key}`));
      };
      document.head.appendChild(script);
    });
  }

  // -- building elements (text only, never HTML) ------------------------------------------------

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node[name] = value;
    }
    for (const child of children) node.append(child);
    return node;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
    return node;
  }

  function visible(token) {
    // whitespace that would otherwise vanish or break the line
    return token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
  }

  function num(x, digits = 3) {
    if (x === 0) return "0";
    const a = Math.abs(x);
    return a >= 1e-3 && a < 1e4 ? x.toFixed(digits) : x.toExponential(digits - 1);
  }

  function percent(x) {
    return `${(100 * x).toPrecision(4)}%`;
  }

  function featureLink(feature, label) {
    return el("a", { href: `feature.html#${feature}`, text: label ?? `#${feature}`, class: "feature-link" });
  }

  function clear(node) {
    node.replaceChildren();
    return node;
  }

  // -- pieces of pages ------------------------------------------------------------------------

  function tokens(example, max) {
    const line = el("span", { class: "tokens" });
    example.tokens.forEach((text, i) => {
      const value = example.values[i];
      const span = el("span", { class: i === example.active ? "tok active" : "tok", text: visible(text) });
      span.title = `${JSON.stringify(text)}  activation ${value}`;
      if (value > 0) span.style.backgroundColor = `rgba(255, 136, 0, ${Math.min(1, 0.15 + 0.85 * value / max)})`;
      line.append(span);
    });
    return line;
  }

  function histogram(target, centers, counts, label) {
    clear(target);
    if (!counts.length) {
      target.append(el("p", { class: "muted", text: "nothing to show" }));
      return;
    }
    const width = 320, height = 110, pad = 16;
    const chart = svg("svg", { viewBox: `0 0 ${width} ${height + pad}`, width, height: height + pad, role: "img" });
    const top = Math.max(...counts, 1);
    const step = width / counts.length;
    counts.forEach((count, i) => {
      const h = (height - 4) * count / top;
      const bar = svg("rect", { x: i * step + 0.5, y: height - h, width: Math.max(step - 1, 1), height: h, class: "bar" });
      const tip = svg("title");
      tip.textContent = `${label} ≈ ${num(centers[i])}: ${count}`;
      bar.append(tip);
      chart.append(bar);
    });
    const half = centers.length > 1 ? (centers[1] - centers[0]) / 2 : 0;
    for (const [x, anchor, value] of [[0, "start", centers[0] - half], [width, "end", centers[centers.length - 1] + half]]) {
      const text = svg("text", { x, y: height + pad - 3, "text-anchor": anchor, class: "axis" });
      text.textContent = num(value, 2);
      chart.append(text);
    }
    target.append(chart);
  }

  // The SAE as the pages title it: its name, and the hook it reads when the name is not that hook.
  function saeTitle(meta) {
    return meta.sae === meta.hook ? meta.sae : `${meta.sae} (${meta.hook})`;
  }

  function searchBox() {
    const form = document.getElementById("search");
    if (!form) return;
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const value = document.getElementById("search-input").value.trim();
      if (/^\d+$/.test(value)) window.location.href = `feature.html#${Number(value)}`;
    });
  }

  // -- pages ------------------------------------------------------------------------------------

  function indexPage(meta) {
    document.getElementById("title").textContent = saeTitle(meta);
    document.getElementById("summary").textContent =
      `${meta.model} over ${meta.dataset}: ${meta.n_tokens.toLocaleString("en")} tokens, ` +
      `${meta.d_sae.toLocaleString("en")} features (pages for ${meta.features[0]} to ${meta.features[1] - 1}), ` +
      `${meta.rows.length} prompt pages.`;
    const body = document.querySelector("#busiest tbody");
    for (const [feature, density, max] of meta.busiest) {
      body.append(el("tr", {}, [el("td", {}, [featureLink(feature)]), el("td", { text: percent(density) }),
                                el("td", { text: num(max) })]));
    }
  }

  function featureNumber(meta) {
    const text = decodeURIComponent(window.location.hash.slice(1));
    if (text === "") return meta.busiest.length ? meta.busiest[0][0] : meta.features[0];
    return /^\d+$/.test(text) ? Number(text) : NaN;
  }

  async function featurePage(meta) {
    const message = document.getElementById("message");
    const panel = document.getElementById("feature");
    const feature = featureNumber(meta);
    document.getElementById("search-input").value = Number.isNaN(feature) ? "" : feature;
    const [first, stop] = meta.features;
    document.getElementById("prev").href = `#${Math.max(first, (feature || first) - 1)}`;
    document.getElementById("next").href = `#${Math.min(stop - 1, (feature || first) + 1)}`;
    document.getElementById("title").textContent = `${saeTitle(meta)} · feature ${Number.isNaN(feature) ? "?" : feature}`;
    document.title = `feature ${feature} · latentstore`;
    if (Number.isNaN(feature) || feature < first || feature >= stop) {
      panel.hidden = true;
      message.textContent = `This dashboard has pages for features ${first} to ${stop - 1}; ` +
        `give one of those (the SAE has ${meta.d_sae}).`;
      return;
    }
    message.textContent = "loading…";
    let data;
    try {
      data = await LS.load("features", feature);
    } catch (error) {
      panel.hidden = true;
      message.textContent = `Feature ${feature}'s data file is missing: rerun latentstore dashboard.`;
      return;
    }
    if (featureNumber(meta) !== feature) return; // the reader moved on while this loaded
    message.textContent = "";
    renderFeature(data, meta);
    panel.hidden = false;
  }

  function renderFeature(data, meta) {
    document.getElementById("stats").textContent = data.n_fired
      ? `Fires on ${data.n_fired.toLocaleString("en")} of ${meta.n_tokens.toLocaleString("en")} tokens ` +
        `(density ${percent(data.frac_nonzero)}, ${data.frac_nonzero}); max activation ${num(data.max)}.`
      : "Never fires in this store.";
    histogram(document.getElementById("act-hist"), data.hist[0], data.hist[1], "activation");
    const logitBody = clear(document.querySelector("#logits tbody"));
    if (data.logits) {
      histogram(document.getElementById("logit-hist"), data.logits.hist[0], data.logits.hist[1], "logit");
      const [negText, negValues] = data.logits.neg, [posText, posValues] = data.logits.pos;
      negText.forEach((_, i) => {
        logitBody.append(el("tr", {}, [
          el("td", { class: "tok neg", text: visible(negText[i]) }), el("td", { class: "num", text: num(negValues[i]) }),
          el("td", { class: "tok pos", text: visible(posText[i]) }), el("td", { class: "num", text: num(posValues[i]) }),
        ]));
      });
    } else {
      clear(document.getElementById("logit-hist")).append(el("p", { class: "muted", text: "made without weights" }));
    }
    const cofiring = clear(document.querySelector("#cofiring tbody"));
    for (const c of data.cofiring) {
      cofiring.append(el("tr", {}, [el("td", {}, [featureLink(c.feature)]), el("td", { class: "num", text: c.count }),
                                    el("td", { class: "num", text: percent(c.fraction) }),
                                    el("td", { class: "num", text: num(c.jaccard) })]));
    }
    const groups = clear(document.getElementById("groups"));
    const rows = new Set(meta.rows);
    if (data.groups.some((group) => group.kind === "rank")) {
      groups.append(el("p", { class: "muted", text: "Below the top activations: true quantiles, groups of equal "
        + "count by rank (SAEDashboard and the Neuronpedia export use 5 equal-width intervals of [0, max] instead)." }));
    }
    data.groups.forEach((group, g) => {
      const title = group.kind === "top"
        ? `Top activations`
        : group.kind === "rank"
          ? `Quantile ${g} (by rank): activations ${num(group.bin_min)} to ${num(group.bin_max)} (${percent(group.bin_contains)} of them)`
          : `Interval ${g}: activations ${num(group.bin_min)} to ${num(group.bin_max)} (${percent(group.bin_contains)} of them)`;
      const section = el("section", { class: `group group-${group.kind}` }, [el("h2", { text: title })]);
      for (const example of group.examples) {
        const where = rows.has(example.row)
          ? el("a", { href: `prompt.html#${example.row}`, text: `row ${example.row}` })
          : el("span", { text: `row ${example.row}` });
        section.append(el("div", { class: "example" }, [
          el("span", { class: "where" }, [where, el("span", { text: ` · pos ${example.pos}` })]),
          el("span", { class: "value", text: num(example.activation), title: String(example.activation) }),
          tokens(example, data.max),
        ]));
      }
      groups.append(section);
    });
  }

  function rowNumber(meta) {
    const text = decodeURIComponent(window.location.hash.slice(1));
    if (text === "") return meta.rows.length ? meta.rows[0] : NaN;
    return /^\d+$/.test(text) ? Number(text) : NaN;
  }

  let promptShown = 0; // counts what the prompt page was asked to show, so a late answer is dropped

  async function promptPage(meta) {
    const select = document.getElementById("row-select");
    if (!select.options.length) {
      for (const row of meta.rows) select.append(el("option", { value: String(row), text: `row ${row}` }));
      select.addEventListener("change", () => {
        // after a typed prompt the hash may already name the row picked, and then no hashchange comes
        if (window.location.hash === `#${select.value}`) promptPage(meta);
        else window.location.hash = `#${select.value}`;
      });
    }
    const row = rowNumber(meta);
    const message = document.getElementById("message");
    const shown = ++promptShown;
    if (Number.isNaN(row) || !meta.rows.includes(row)) {
      renderPrompt({ tokens: [], pos: [], features: [] });
      message.textContent = "Pick a dataset row: this dashboard has prompt pages for the rows listed.";
      return;
    }
    select.value = String(row);
    document.getElementById("title").textContent = `${saeTitle(meta)} · dataset row ${row}`;
    message.textContent = "loading…";
    const data = await LS.load("rows", row);
    if (shown !== promptShown) return;
    message.textContent = "";
    renderPrompt(data);
  }

  // A prompt typed into the box, sent to `latentstore dashboard --serve`. The box shows only when
  // server.js says a model is loaded; the site's own server.js says none, so from file:// or a
  // plain static server the page makes no request.
  function typedPrompts(meta) {
    const server = received.get("server");
    const form = document.getElementById("typed");
    if (!server || !form) return;
    document.getElementById("typed-limit").textContent =
      `up to ${server.max_tokens} tokens; the ${server.k} strongest features at each, from ${server.model}`;
    form.hidden = false;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const message = document.getElementById("message");
      const shown = ++promptShown;
      document.getElementById("title").textContent = `${saeTitle(meta)} · typed prompt`;
      document.getElementById("row-select").value = "";
      message.textContent = "running the model…";
      let answer;
      try {
        const response = await fetch("api/prompt", {
          method: "POST", headers: { "Content-Type": "application/json" },
          body: JSON.stringify({ text: document.getElementById("typed-text").value }),
        });
        answer = await response.json();
      } catch (error) {
        answer = { error: "The server gave no answer: is `latentstore dashboard --serve` still running? " +
                          "Its output says more." };
      }
      if (shown !== promptShown) return;
      renderPrompt(answer.error ? { tokens: [], pos: [], features: [] } : answer);
      message.textContent = answer.error ?? "";
    });
  }

  // tokens and the strongest features at each: a dataset row's data file, or the server's answer
  function renderPrompt(data) {
    const prompt = clear(document.getElementById("prompt"));
    const body = clear(document.querySelector("#per-token tbody"));
    const peak = Math.max(1e-9, ...data.features.map((f) => (f.length ? f[0][1] : 0)));
    data.tokens.forEach((text, i) => {
      const strongest = data.features[i].length ? data.features[i][0][1] : 0;
      const span = el("span", { class: "tok", text: visible(text) });
      span.title = `pos ${data.pos[i]}  ${JSON.stringify(text)}`;
      if (strongest > 0) span.style.backgroundColor = `rgba(0, 120, 255, ${0.1 + 0.5 * strongest / peak})`;
      prompt.append(span);
      const links = data.features[i].map(([feature, value]) =>
        el("span", { class: "chip" }, [featureLink(feature),
                                       el("span", { text: ` ${num(value, 2)}`, title: String(value) })]));
      body.append(el("tr", {}, [el("td", { class: "num", text: data.pos[i] }),
                                el("td", { class: "tok", text: visible(text) }), el("td", {}, links)]));
    });
  }

  function start() {
    const meta = received.get("meta");
    searchBox();
    const page = document.body.dataset.page;
    if (page === "index") indexPage(meta);
    if (page === "feature") {
      featurePage(meta);
      window.addEventListener("hashchange", () => featurePage(meta));
    }
    if (page === "prompt") {
      typedPrompts(meta);
      promptPage(meta);
      window.addEventListener("hashchange", () => promptPage(meta));
    }
  }

  document.addEventListener("DOMContentLoaded", start);
  return { receive, load };
})();
