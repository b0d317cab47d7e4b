/* vpeft HTML leaderboard: sortable, filterable table and an interactive Pareto plot (inline SVG).
 * No dependencies, no network. Open the page with #selftest to run the self-test (see html.py). */
(function () {
  "use strict";
  var SVGNS = "http://www.w3.org/2000/svg";
  var data = JSON.parse(document.getElementById("leaderboard-data").textContent);
  var state = { sortKey: null, sortDir: 0, filter: "", families: {}, completeOnly: false,
                yMetric: "mean_tasks", showPublished: true, selected: null };
  var tbody = document.querySelector("#leaderboard tbody");
  var thead = document.querySelector("#leaderboard thead");
  var rowEls = {};

  function el(tag, attrs, text) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function svg(tag, attrs, text) {
    var e = document.createElementNS(SVGNS, tag);
    Object.keys(attrs || {}).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) e.textContent = text;
    return e;
  }
  function colour(family) { return data.family_colors[family] || "#000000"; }

  /* ------------------------------------------------------------------ table */
  function buildHeader() {
    var groupRow = el("tr", { "class": "group-row" });
    var headRow = el("tr");
    var lastGroup = null, span = null;
    data.columns.forEach(function (col) {
      var g = col.group || "";
      if (g !== lastGroup || !span) {
        span = el("th", { colspan: "1", scope: "colgroup" }, g);
        groupRow.appendChild(span);
        lastGroup = g;
      } else {
        span.setAttribute("colspan", String(Number(span.getAttribute("colspan")) + 1));
      }
      var th = el("th", { scope: "col", "data-key": col.key, "aria-sort": "none",
                          "class": col.type === "num" ? "num" : "text" });
      var button = el("button", { type: "button", title: (col.title || col.label) + " (click to sort)" }, col.label);
      button.addEventListener("click", function () { sortBy(col.key); });
      th.appendChild(button);
      headRow.appendChild(th);
    });
    thead.appendChild(groupRow);
    thead.appendChild(headRow);
  }

  function buildRows() {
    data.rows.forEach(function (row) {
      var tr = el("tr", { "data-method": row.method, "data-family": row.family });
      data.columns.forEach(function (col) {
        var cell = row.cells[col.key] || [null, "-"];
        var td = el("td", { "class": col.type === "num" ? "num" : "text" }, cell[1]);
        if (col.key === "method") {
          td.insertBefore(el("span", { "class": "swatch", style: "background:" + colour(row.family) }), td.firstChild);
        }
        tr.appendChild(td);
      });
      tr.addEventListener("click", function () { select(row.method); });
      rowEls[row.method] = tr;
      tbody.appendChild(tr);
    });
  }

  function columnType(key) {
    for (var i = 0; i < data.columns.length; i++) if (data.columns[i].key === key) return data.columns[i].type;
    return "text";
  }

  function sortBy(key) {
    if (state.sortKey === key) state.sortDir = -state.sortDir;
    else { state.sortKey = key; state.sortDir = columnType(key) === "num" ? -1 : 1; }  // numbers: best first
    var dir = state.sortDir;
    var rows = data.rows.slice();
    rows.sort(function (a, b) {
      var va = (a.cells[key] || [null])[0], vb = (b.cells[key] || [null])[0];
      if (va === null && vb === null) return 0;
      if (va === null) return 1;  // missing values last in both directions
      if (vb === null) return -1;
      if (typeof va === "number" && typeof vb === "number") return dir * (va - vb);
      return dir * String(va).localeCompare(String(vb));
    });
    rows.forEach(function (r) { tbody.appendChild(rowEls[r.method]); });
    Array.prototype.forEach.call(thead.querySelectorAll("th[data-key]"), function (th) {
      th.setAttribute("aria-sort", th.getAttribute("data-key") === key ? (dir > 0 ? "ascending" : "descending") : "none");
    });
  }

  function visible(item) {
    if (state.families[item.family] === false) return false;
    if (state.completeOnly && item.complete === false) return false;
    var f = state.filter.trim().toLowerCase();
    if (!f) return true;
    return f.split(/[\s,]+/).some(function (term) {
      return term && (item.method.toLowerCase().indexOf(term) >= 0 || (item.family || "").toLowerCase().indexOf(term) >= 0);
    });
  }

  function applyFilter() {
    var shown = 0;
    data.rows.forEach(function (row) {
      var on = visible(row);
      rowEls[row.method].hidden = !on;
      if (on) shown++;
    });
    document.getElementById("count").textContent = shown + " of " + data.rows.length + " methods";
    drawPlot();
  }

  function buildControls() {
    var box = document.getElementById("family-filters");
    Object.keys(data.family_colors).forEach(function (fam) {
      var label = el("label", { "class": "family" });
      var input = el("input", { type: "checkbox", "data-family": fam });
      input.checked = true;
      input.addEventListener("change", function () { state.families[fam] = input.checked; applyFilter(); });
      label.appendChild(input);
      label.appendChild(el("span", { "class": "swatch", style: "background:" + colour(fam) }));
      label.appendChild(document.createTextNode(fam));
      box.appendChild(label);
    });
    document.getElementById("filter").addEventListener("input", function (e) {
      state.filter = e.target.value; applyFilter();
    });
    document.getElementById("complete-only").addEventListener("change", function (e) {
      state.completeOnly = e.target.checked; applyFilter();
    });
    var ysel = document.getElementById("y-metric");
    Object.keys(data.y_metrics).forEach(function (k) { ysel.appendChild(el("option", { value: k }, data.y_metrics[k])); });
    ysel.addEventListener("change", function () { state.yMetric = ysel.value; drawPlot(); });
    if (data.published_points.length) {
      document.getElementById("published-toggle").hidden = false;
      document.getElementById("show-published").addEventListener("change", function (e) {
        state.showPublished = e.target.checked; drawPlot();
      });
    }
  }

  function select(method) {
    state.selected = state.selected === method ? null : method;
    Object.keys(rowEls).forEach(function (m) { rowEls[m].classList.toggle("selected", m === state.selected); });
    if (state.selected && rowEls[state.selected].scrollIntoView) rowEls[state.selected].scrollIntoView({ block: "nearest" });
    drawPlot();
  }

  /* ------------------------------------------------------------------ plot */
  function paretoFront(points) {
    return points.filter(function (p) {
      return !points.some(function (q) {
        return q !== p && q.params <= p.params && q.y >= p.y && (q.params < p.params || q.y > p.y);
      });
    });
  }

  function niceStep(span, n) {
    var raw = span / Math.max(n, 1), mag = Math.pow(10, Math.floor(Math.log10(raw))), r = raw / mag;
    return (r < 1.5 ? 1 : r < 3 ? 2 : r < 7 ? 5 : 10) * mag;
  }

  function overlaps(a, b) { return a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h; }

  function drawPlot() {
    var host = document.getElementById("plot");
    host.textContent = "";
    var W = 860, H = 500, m = { l: 64, r: 24, t: 16, b: 52 };
    var root = svg("svg", { id: "pareto", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img",
                            "aria-label": "accuracy against trainable parameters" });
    var key = state.yMetric, zero = data.zero_params_at;
    var pts = data.points.filter(function (p) {
      return p[key] !== null && visible({ method: p.method, family: p.family, complete: true });
    }).map(function (p) {
      return { method: p.method, family: p.family, params: p.params, x: Math.max(p.params, zero), y: p[key],
               err: p[key + "_std"], ppt: p.ppt, seeds: p.seeds, published: false };
    });
    var pub = !state.showPublished ? [] : data.published_points.filter(function (p) {
      return visible({ method: p.method, family: p.family, complete: true });
    }).map(function (p) {
      return { method: p.method, family: p.family, params: p.params, x: Math.max(p.params, zero), y: p[key],
               err: null, published: true };
    });
    var all = pts.concat(pub);
    if (!all.length) {
      root.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", "class": "empty" }, "no method to plot"));
      host.appendChild(root);
      return;
    }
    var lx = all.map(function (p) { return Math.log10(p.x); });
    var x0 = Math.floor(Math.min.apply(null, lx) - 0.3), x1 = Math.ceil(Math.max.apply(null, lx) + 0.3);
    var ys = [];
    all.forEach(function (p) { ys.push(p.y - (p.err || 0), p.y + (p.err || 0)); });
    var y0 = Math.min.apply(null, ys), y1 = Math.max.apply(null, ys), pad = Math.max((y1 - y0) * 0.12, 0.5);
    y0 -= pad; y1 += pad;
    var sx = function (v) { return m.l + (Math.log10(v) - x0) / (x1 - x0) * (W - m.l - m.r); };
    var sy = function (v) { return H - m.b - (v - y0) / (y1 - y0) * (H - m.t - m.b); };
    var axes = svg("g", { "class": "axes" });
    for (var e = x0; e <= x1; e++) {
      var X = sx(Math.pow(10, e));
      axes.appendChild(svg("line", { x1: X, x2: X, y1: m.t, y2: H - m.b, "class": "grid" }));
      axes.appendChild(svg("text", { x: X, y: H - m.b + 16, "text-anchor": "middle" }, e === 0 ? "1" : "1e" + e));
    }
    var step = niceStep(y1 - y0, 6);
    for (var t = Math.ceil(y0 / step) * step; t <= y1; t += step) {
      var Y = sy(t);
      axes.appendChild(svg("line", { x1: m.l, x2: W - m.r, y1: Y, y2: Y, "class": "grid" }));
      axes.appendChild(svg("text", { x: m.l - 6, y: Y + 4, "text-anchor": "end" }, (Math.round(t * 100) / 100).toString()));
    }
    axes.appendChild(svg("rect", { x: m.l, y: m.t, width: W - m.l - m.r, height: H - m.t - m.b, "class": "frame" }));
    axes.appendChild(svg("text", { x: (m.l + W - m.r) / 2, y: H - 10, "text-anchor": "middle", "class": "axis-label" },
      "trainable parameters without head (log; 0 drawn at " + zero + ")"));
    axes.appendChild(svg("text", { x: 14, y: (m.t + H - m.b) / 2, "text-anchor": "middle", "class": "axis-label",
                                   transform: "rotate(-90 14 " + (m.t + H - m.b) / 2 + ")" }, data.y_metrics[key]));
    root.appendChild(axes);

    var front = paretoFront(pts).sort(function (a, b) { return a.x - b.x || a.y - b.y; });
    if (front.length) {
      root.appendChild(svg("polyline", { "class": "front", points: front.map(function (p) {
        return sx(p.x).toFixed(1) + "," + sy(p.y).toFixed(1); }).join(" "), "data-methods": front.map(function (p) {
        return p.method; }).join(",") }));
    }
    var frontSet = {};
    front.forEach(function (p) { frontSet[p.method] = true; });
    var layer = svg("g", { "class": "points" }), labels = svg("g", { "class": "labels" });
    var boxes = all.map(function (p) { return { x: sx(p.x) - 6, y: sy(p.y) - 6, w: 12, h: 12 }; });
    all.forEach(function (p) {
      var cx = sx(p.x), cy = sy(p.y), c = colour(p.family);
      var g = svg("g", { "class": "point" + (p.published ? " published" : "") + (frontSet[p.method] && !p.published ? " on-front" : "") +
                         (state.selected === p.method ? " selected" : ""), "data-method": p.method, tabindex: "0" });
      if (p.err) {
        g.appendChild(svg("line", { x1: cx, x2: cx, y1: sy(p.y - p.err), y2: sy(p.y + p.err), stroke: c, "class": "errbar" }));
        [p.y - p.err, p.y + p.err].forEach(function (v) {
          g.appendChild(svg("line", { x1: cx - 4, x2: cx + 4, y1: sy(v), y2: sy(v), stroke: c, "class": "errbar" }));
        });
      }
      g.appendChild(svg("circle", { cx: cx, cy: cy, r: 6, fill: p.published ? "white" : c, stroke: p.published ? c : "#222" }));
      var tip = p.method + (p.published ? " (published)" : "") + " — " + p.family + "\n" + data.y_metrics[key] + ": " +
        p.y.toFixed(2) + (p.err ? " ± " + p.err.toFixed(2) : "") + "\nparams: " + (p.params / 1e6).toFixed(3) + " M" +
        (p.ppt !== undefined && p.ppt !== null ? "\nPPT: " + p.ppt.toFixed(2) : "") + (p.seeds ? "\nseeds: " + p.seeds : "");
      g.appendChild(svg("title", {}, tip));
      g.addEventListener("mouseenter", function (ev) { showTip(tip, ev); });
      g.addEventListener("mouseleave", hideTip);
      if (!p.published) g.addEventListener("click", function () { select(p.method); });
      layer.appendChild(g);
    });
    root.appendChild(layer);
    root.appendChild(labels);
    host.appendChild(root);  // in the document, so that text can be measured
    // labels: the first nearby spot that hits no other label, point or the frame
    var placed = [], lineH = 12;  // fallbacks where text cannot be measured
    var order = all.map(function (p, i) { return i; }).sort(function (a, b) { return all[a].x - all[b].x; });
    order.forEach(function (i) {
      var p = all[i], cx = sx(p.x), cy = sy(p.y), text = p.method + (p.published ? "*" : "");
      var node = svg("text", { x: 0, y: 0, "class": "label" + (p.published ? " published" : ""), "data-method": p.method }, text);
      labels.appendChild(node);
      var measured = node.getBBox ? node.getBBox() : null;
      var w = measured && measured.width ? measured.width + 2 : text.length * 6.4;
      var top = measured && measured.height ? measured.y : -lineH + 2;
      var h = measured && measured.height ? measured.height : lineH;
      var cands = [];
      [1, 2, 3, 4].forEach(function (k) {
        [[9, -4], [9, 12], [-9 - w, -4], [-9 - w, 12], [-w / 2, -10], [-w / 2, 20]].forEach(function (o) {
          cands.push([cx + (o[0] >= 0 ? o[0] * k : o[0] - 9 * (k - 1)), cy + (o[1] < 0 ? o[1] - 8 * (k - 1) : o[1] + 8 * (k - 1))]);
        });
      });
      var best = null;
      cands.forEach(function (c) {
        if (best && best.cost === 0) return;
        var b = { x: c[0], y: c[1] + top, w: w, h: h };
        var cost = 0;
        if (b.x < m.l || b.x + b.w > W - m.r || b.y < m.t || b.y + b.h > H - m.b) cost += 1e6;
        placed.forEach(function (q) { if (overlaps(b, q)) cost += 1000; });
        boxes.forEach(function (q) { if (overlaps(b, q)) cost += 100; });
        if (!best || cost < best.cost) best = { cost: cost, pos: c, box: b };
      });
      placed.push(best.box);
      var far = Math.abs(best.pos[0] - cx) > 40 || Math.abs(best.pos[1] - cy) > 30;
      if (far) labels.insertBefore(svg("line", { x1: cx, y1: cy, x2: best.box.x + (best.box.x > cx ? 0 : best.box.w),
                                                  y2: best.box.y + h / 2, "class": "leader" }), labels.firstChild);
      node.setAttribute("x", best.pos[0].toFixed(1));
      node.setAttribute("y", best.pos[1].toFixed(1));
    });
    var legend = el("div", { "class": "legend" });
    Object.keys(data.family_colors).forEach(function (fam) {
      var item = el("span", { "class": "legend-item" });
      item.appendChild(el("span", { "class": "swatch", style: "background:" + colour(fam) }));
      item.appendChild(document.createTextNode(fam));
      legend.appendChild(item);
    });
    var frontItem = el("span", { "class": "legend-item" }, "— Pareto front (measured)");
    legend.appendChild(frontItem);
    if (data.published_points.length) legend.appendChild(el("span", { "class": "legend-item" }, "○ / * published (best test epoch)"));
    host.appendChild(legend);
  }

  var tipEl = document.getElementById("tooltip");
  function showTip(text, ev) {
    tipEl.textContent = text;
    tipEl.hidden = false;
    var r = document.getElementById("plot-section").getBoundingClientRect();
    tipEl.style.left = (ev.clientX - r.left + 14) + "px";
    tipEl.style.top = (ev.clientY - r.top + 10) + "px";
  }
  function hideTip() { tipEl.hidden = true; }

  /* ------------------------------------------------------------------ self-test */
  function visibleOrder() {
    return Array.prototype.filter.call(tbody.querySelectorAll("tr"), function (tr) { return !tr.hidden; })
      .map(function (tr) { return tr.getAttribute("data-method"); });
  }
  function clickHeader(key) { thead.querySelector('th[data-key="' + key + '"] button').click(); return visibleOrder(); }

  function selftest() {
    var out = {};
    try {
      out.rows = visibleOrder();
      out.mean_first_click = clickHeader("mean_tasks");
      out.mean_aria = thead.querySelector('th[data-key="mean_tasks"]').getAttribute("aria-sort");
      out.mean_second_click = clickHeader("mean_tasks");
      out.params_first_click = clickHeader("params_m");
      out.method_first_click = clickHeader("method");
      out.svg_points = document.querySelectorAll("#pareto g.point:not(.published)").length;
      out.svg_published_points = document.querySelectorAll("#pareto g.point.published").length;
      var front = document.querySelector("#pareto polyline.front");
      out.front = front ? front.getAttribute("data-methods").split(",") : [];
      out.front_vertices = front ? front.getAttribute("points").trim().split(/\s+/).length : 0;
      var labelEls = Array.prototype.slice.call(document.querySelectorAll("#pareto text.label"));
      var rects = labelEls.map(function (t) { var b = t.getBBox(); return { x: b.x, y: b.y, w: b.width, h: b.height }; });
      var clashes = [];
      for (var i = 0; i < rects.length; i++) for (var j = i + 1; j < rects.length; j++) {
        if (overlaps(rects[i], rects[j])) clashes.push([labelEls[i].textContent, labelEls[j].textContent]);
      }
      out.labels = labelEls.length;
      out.label_overlaps = clashes;
      var input = document.getElementById("filter");
      input.value = "lora";
      input.dispatchEvent(new Event("input"));
      out.filter_lora_rows = visibleOrder();
      out.filter_lora_points = document.querySelectorAll("#pareto g.point:not(.published)").length;
      input.value = "";
      input.dispatchEvent(new Event("input"));
      var ysel = document.getElementById("y-metric");
      ysel.value = "group_mean";
      ysel.dispatchEvent(new Event("change"));
      var f2 = document.querySelector("#pareto polyline.front");
      out.front_group_mean = f2 ? f2.getAttribute("data-methods").split(",") : [];
      ysel.value = "mean_tasks";
      ysel.dispatchEvent(new Event("change"));
      clickHeader("mean_tasks");  // leave the page sorted best first
      out.ok = true;
    } catch (err) {
      out.ok = false;
      out.error = String(err && err.stack || err);
    }
    var pre = document.getElementById("selftest-result");
    pre.textContent = JSON.stringify(out);
    pre.setAttribute("data-done", "1");
  }

  buildControls();
  buildHeader();
  buildRows();
  applyFilter();
  if (data.columns.some(function (c) { return c.key === "mean_tasks"; })) sortBy("mean_tasks");
  if (location.hash === "#selftest") selftest();
})();
