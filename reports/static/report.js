/* training-diagnostics report: turns each chart's JSON into an interactive uPlot chart.
 *
 * Drag across a chart to zoom into those steps (every chart of the same group follows), double-click
 * or press "reset zoom" to go back; the legend shows the values under the cursor, and clicking a legend
 * entry hides that series. The run switches at the top hide a run in every chart. Without this script
 * (or when printing) the static figure under each chart is shown instead.
 */
(function () {
  "use strict";
  if (typeof uPlot === "undefined" || !document.querySelector) return;
  document.documentElement.classList.add("js");

  var charts = [];        // every built uPlot, in page order
  var byId = {};          // chart element id -> uPlot
  var groups = {};        // group key -> {charts: [], min, max, zoomed}
  var hiddenRuns = {};    // run position -> true when switched off
  var syncing = false;
  window.tdiag = {charts: byId, list: charts, hiddenRuns: hiddenRuns};

  function fmt(v) {
    if (v == null || isNaN(v)) return "\u2013";
    if (!isFinite(v)) return v > 0 ? "+inf" : "-inf";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(3);
    return String(Number(v.toPrecision(5)));
  }

  // y-axis labels, as short as they can be: "1e-5", "0.25", "1500"
  function fmtTick(v) {
    if (v == null) return "";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) {
      var parts = v.toExponential(1).split("e");
      return parts[0].replace(/\.0$/, "") + "e" + Number(parts[1]);
    }
    return String(Number(v.toPrecision(4)));
  }

  function runShown(run) {
    return run == null || !hiddenRuns[run];
  }

  function setDash(ctx, dash, pr) {
    ctx.setLineDash(dash ? dash.map(function (d) { return d * pr; }) : []);
  }

  // Threshold rules, alert marks and non-finite crosses, drawn over the series inside the plot area.
  function drawExtras(u) {
    var spec = u.tdiagSpec, ctx = u.ctx, b = u.bbox, pr = uPlot.pxRatio;
    ctx.save();
    ctx.beginPath();
    ctx.rect(b.left, b.top, b.width, b.height);
    ctx.clip();
    ctx.lineWidth = pr;
    spec.marks.forEach(function (m) {
      if (!runShown(m.run)) return;
      var x = u.valToPos(m.x, "x", true);
      if (x < b.left || x > b.left + b.width) return;
      ctx.strokeStyle = m.color;
      ctx.globalAlpha = 0.75;
      setDash(ctx, m.dash, pr);
      ctx.beginPath();
      ctx.moveTo(x, b.top);
      ctx.lineTo(x, b.top + b.height);
      ctx.stroke();
    });
    ctx.globalAlpha = 1;
    ctx.font = (11 * pr) + "px sans-serif";
    ctx.textAlign = "right";
    ctx.textBaseline = "bottom";
    spec.rules.forEach(function (r) {
      if (!runShown(r.run)) return;
      var y = u.valToPos(r.y, "y", true);
      if (!isFinite(y) || y < b.top - 1 || y > b.top + b.height + 1) return;
      ctx.strokeStyle = r.color;
      ctx.lineWidth = 1.2 * pr;
      setDash(ctx, r.dash, pr);
      ctx.beginPath();
      ctx.moveTo(b.left, y);
      ctx.lineTo(b.left + b.width, y);
      ctx.stroke();
      setDash(ctx, null, pr);
      var ty = y - 2 * pr < b.top + 12 * pr ? y + 14 * pr : y - 2 * pr;
      ctx.lineWidth = 3 * pr;
      ctx.strokeStyle = "rgba(255,255,255,0.9)";
      ctx.strokeText(r.label, b.left + b.width - 4 * pr, ty);
      ctx.fillStyle = r.color;
      ctx.fillText(r.label, b.left + b.width - 4 * pr, ty);
    });
    ctx.lineWidth = 1.2 * pr;
    setDash(ctx, null, pr);
    ctx.strokeStyle = "#000";
    var yb = b.top + b.height - 5 * pr, d = 3 * pr;
    spec.series.forEach(function (s, i) {
      if (!s.bad.length || !u.series[i + 1].show) return;
      s.bad.forEach(function (xv) {
        var x = u.valToPos(xv, "x", true);
        if (x < b.left || x > b.left + b.width) return;
        ctx.beginPath();
        ctx.moveTo(x - d, yb - d); ctx.lineTo(x + d, yb + d);
        ctx.moveTo(x - d, yb + d); ctx.lineTo(x + d, yb - d);
        ctx.stroke();
      });
    });
    ctx.restore();
  }

  // Round log ticks: powers of ten, or 1-2-5 steps when the range spans less than two decades.
  function logSplits(min, max) {
    var a = Math.floor(Math.log10(min)), b = Math.ceil(Math.log10(max)), out = [], k, m;
    for (k = a; k <= b; k++) {
      var p = Math.pow(10, k);
      if (p >= min * 0.999 && p <= max * 1.001) out.push(p);
    }
    if (out.length >= 3) {
      var stride = Math.ceil(out.length / 7);
      return out.filter(function (v, i) { return i % stride === 0; });
    }
    var mults = out.length >= 2 ? [1, 2, 5] : [1, 2, 3, 5];
    out = [];
    for (k = a; k <= b; k++) {
      for (m = 0; m < mults.length; m++) {
        var v = Number((mults[m] * Math.pow(10, k)).toPrecision(3));
        if (v >= min * 0.999 && v <= max * 1.001) out.push(v);
      }
    }
    return out;
  }

  // The y-range of the visible data, widened to hold the threshold rules (a threshold the data never
  // reaches is still drawn, so the reader sees how far away it is).
  function yScale(spec) {
    var sc = {}, inc = spec.rules.map(function (r) { return r.y; });
    if (spec.scale === "log") { sc.distr = 3; sc.log = 10; }
    else if (spec.scale === "asinh") { sc.distr = 4; sc.asinh = spec.linthresh || 1; }
    if (spec.yrange) {
      var lo = spec.yrange[0], hi = spec.yrange[1];
      sc.range = function () { return [lo, hi]; };
      return sc;
    }
    sc.range = function (u, min, max) {
      inc.forEach(function (y) {
        if (spec.scale === "log" && y <= 0) return;
        min = min == null ? y : Math.min(min, y);
        max = max == null ? y : Math.max(max, y);
      });
      if (min == null || max == null) return [0, 1];
      if (spec.scale === "log") {
        if (min <= 0) min = max / 10;
        return max > min ? [min / 1.15, max * 1.15] : [min / 2, max * 2];
      }
      if (spec.scale === "asinh") return uPlot.rangeAsinh(min, max, 10, true);
      return uPlot.rangeNum(min, max, 0.1, true);
    };
    return sc;
  }

  function yAxis(spec) {
    var ax = {label: spec.ylabel, labelSize: 18, size: 58, stroke: "#444", grid: {stroke: "#eee"},
              values: function (u, vals) { return vals.map(fmtTick); }};
    if (spec.scale === "asinh") {
      // 0 and signed powers of ten from the linear range outwards
      ax.splits = function (u, i, min, max) {
        var out = min <= 0 && max >= 0 ? [0] : [], c = spec.linthresh || 1;
        for (var k = Math.ceil(Math.log10(c)); Math.pow(10, k) <= Math.max(-min, max) * 1.0001; k++) {
          var p = Math.pow(10, k);
          if (-p >= min) out.push(-p);
          if (p <= max) out.push(p);
        }
        out.sort(function (a, b) { return a - b; });
        var stride = Math.ceil(out.length / 7);
        return out.filter(function (v, j) { return j % stride === 0 || v === 0; });
      };
      ax.filter = function (u, splits) { return splits; };
    }
    if (spec.scale === "log") {
      ax.splits = function (u, i, min, max) { return logSplits(min, max); };
      // uPlot's log axes blank out labels other than 1-2-5 multiples; ours are already chosen
      ax.filter = function (u, splits) { return splits; };
    }
    return ax;
  }

  function group(key) {
    if (!groups[key]) groups[key] = {charts: [], min: null, max: null, zoom: null};
    return groups[key];
  }

  function zoomGroup(g, min, max, source) {
    if (syncing) return;
    syncing = true;
    try {
      g.zoom = [min, max];
      g.charts.forEach(function (o) { if (o !== source) o.setScale("x", {min: min, max: max}); });
    } finally { syncing = false; }
  }

  function resetGroup(g) {
    syncing = true;
    try {
      g.zoom = null;
      g.charts.forEach(function (o) { o.setScale("x", {min: g.min, max: g.max}); });
    } finally { syncing = false; }
  }

  // The rules' and marks' key, built as text nodes: labels may carry run names.
  function keyBar(spec) {
    var bar = document.createElement("div"), seen = {};
    bar.className = "chart-tools";
    spec.rules.concat(spec.marks).forEach(function (k) {
      if (seen[k.label]) return;
      seen[k.label] = 1;
      var key = document.createElement("span"), swatch = document.createElement("i");
      key.className = "key";
      swatch.style.borderTop = "2px " + (k.dash ? "dashed " : "solid ") + k.color;
      key.appendChild(swatch);
      key.appendChild(document.createTextNode(k.label));
      bar.appendChild(key);
    });
    return bar;
  }

  function build(el) {
    if (el.tdiagBuilt) return;
    var live = el.querySelector(".live"), dataEl = el.querySelector("script.chart-data");
    if (!live || !dataEl || live.clientWidth < 50) return;
    el.tdiagBuilt = true;
    var spec = JSON.parse(dataEl.textContent);
    var data = uPlot.join(spec.series.map(function (s) { return [s.x, s.y]; }));
    var series = [{label: "step", value: function (u, v) { return v == null ? "\u2013" : String(v); }}];
    spec.series.forEach(function (s) {
      var opt = {
        label: s.label, stroke: s.color, width: s.width, spanGaps: false,
        show: runShown(s.run), value: function (u, v) { return fmt(v); }
      };
      if (s.dash) opt.dash = s.dash;
      if (!s.markers) opt.points = {show: false};
      if (s.points) {
        opt.paths = function () { return null; };
        opt.points = {show: true, size: 8, width: 1.5, stroke: s.color, fill: "rgba(255,255,255,0)"};
      }
      series.push(opt);
    });
    var g = group(spec.group || el.id);
    var opts = {
      title: spec.title,
      width: live.clientWidth,
      height: spec.height,
      scales: {x: {time: false}, y: yScale(spec)},
      series: series,
      bands: spec.bands.map(function (b) { return {series: [b[0] + 1, b[1] + 1], fill: b[2]}; }),
      axes: [
        {label: "step", labelSize: 18, size: 34, stroke: "#444", grid: {stroke: "#eee"}},
        yAxis(spec)
      ],
      legend: {live: true},
      cursor: {
        sync: {key: spec.group || el.id, scales: ["x", null]},
        drag: {x: true, y: false, setScale: true},
        bind: {dblclick: function () { return function () { resetGroup(g); return null; }; }}
      },
      hooks: {
        draw: [drawExtras],
        setScale: [function (u, key) {
          if (key === "x" && u.tdiagReady && !syncing) zoomGroup(g, u.scales.x.min, u.scales.x.max, u);
        }]
      }
    };
    var u = new uPlot(opts, data, live);
    // Lines drawn without a legend entry (a run's minor lines, named by its main one).
    var rows = u.root.querySelectorAll(".u-legend .u-series");
    spec.series.forEach(function (s, i) {
      if (s.legend === false && rows[i + 1]) rows[i + 1].style.display = "none";
    });
    u.tdiagSpec = spec;
    u.tdiagGroup = g;
    var xs = data[0];
    if (xs.length) {
      g.min = g.min == null ? xs[0] : Math.min(g.min, xs[0]);
      g.max = g.max == null ? xs[xs.length - 1] : Math.max(g.max, xs[xs.length - 1]);
    }
    g.charts.push(u);
    charts.push(u);
    byId[el.id] = u;
    var bar = keyBar(spec);
    var reset = document.createElement("button");
    reset.type = "button";
    reset.textContent = "reset zoom";
    reset.addEventListener("click", function () { resetGroup(g); });
    bar.appendChild(reset);
    live.appendChild(bar);
    u.tdiagReady = true;
  }

  // A group shares one step axis: the union of its charts' steps, or the current zoom.
  function alignGroups() {
    Object.keys(groups).forEach(function (k) {
      var g = groups[k];
      syncing = true;
      try {
        g.charts.forEach(function (u) {
          var r = g.zoom || [g.min, g.max];
          if (r[0] != null && r[1] > r[0]) u.setScale("x", {min: r[0], max: r[1]});
        });
      } finally { syncing = false; }
    });
  }

  function buildAll(root) {
    var els = (root || document).querySelectorAll("div.chart");
    for (var i = 0; i < els.length; i++) build(els[i]);
    alignGroups();
  }

  function setRun(run, shown) {
    if (shown) delete hiddenRuns[run]; else hiddenRuns[run] = true;
    charts.forEach(function (u) {
      u.tdiagSpec.series.forEach(function (s, i) {
        if (s.run === run) u.setSeries(i + 1, {show: shown});
      });
      u.redraw(false, false);
    });
  }

  function resize() {
    charts.forEach(function (u) {
      var w = u.root.parentNode.clientWidth;
      if (w > 50 && Math.abs(w - u.width) > 2) u.setSize({width: w, height: u.height});
    });
  }

  function init() {
    buildAll(document);
    var boxes = document.querySelectorAll("input.run-toggle");
    for (var i = 0; i < boxes.length; i++) {
      boxes[i].addEventListener("change", function (e) {
        setRun(Number(e.target.getAttribute("data-run")), e.target.checked);
      });
    }
    // charts inside folded sections have no width until opened
    document.addEventListener("toggle", function (e) {
      if (e.target.open) buildAll(e.target);
    }, true);
    // print everything: folded sections open for the printout and close again after it
    var opened = [];
    window.addEventListener("beforeprint", function () {
      opened = Array.prototype.filter.call(document.querySelectorAll("details"), function (d) { return !d.open; });
      opened.forEach(function (d) { d.open = true; });
    });
    window.addEventListener("afterprint", function () {
      opened.forEach(function (d) { d.open = false; });
      opened = [];
    });
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(resize, 150);
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
