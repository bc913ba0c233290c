// The pack's frontend: a live loss chart on Train LoRA while it trains (from the server's
// "lora_trainer.progress" events, glue/bridge.py Progress.event), and each node's text result (the saved
// LoRA's name, the reports) shown on the node after it ran.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "LoraTrainer";
const EVENT = "lora_trainer.progress";
const WIDTH = 420;

function domWidget(node, name, element, height) {
  const existing = node.widgets?.find((w) => w.name === name);
  if (existing) return existing;
  const widget = node.addDOMWidget(name, name, element, { serialize: false, getMinHeight: () => height });
  node.setSize([Math.max(node.size[0], WIDTH), Math.max(node.size[1], node.computeSize()[1])]);
  return widget;
}

function showText(node, text) {
  const element = document.createElement("div");
  element.className = "lora-trainer-result";
  element.style.cssText = "white-space: pre-wrap; overflow-wrap: anywhere; font: 12px monospace; " +
    "color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222); padding: 4px; overflow: auto;";
  const widget = domWidget(node, "lora_trainer_result", element, 48);
  widget.element.textContent = text;
  app.graph.setDirtyCanvas(true, true);
}

// ---- the live loss chart ----

function chartOf(node) {
  if (!node.loraTrainerChart) {
    const canvas = document.createElement("canvas");
    canvas.width = 400;
    canvas.height = 200;
    canvas.className = "lora-trainer-loss-chart";
    canvas.style.cssText = "width: 100%; height: 100%; background: #fff;";
    domWidget(node, "lora_trainer_loss_chart", canvas, 200);
    node.loraTrainerChart = { canvas, points: [], samples: [], total: 1 };
  }
  return node.loraTrainerChart;
}

function ticks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count;
  const power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
  return out;
}

function draw(chart) {
  const { canvas, points, samples, total } = chart;
  const ctx = canvas.getContext("2d");
  const W = canvas.width, H = canvas.height, L = 52, R = 10, T = 18, B = 30;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, W, H);
  ctx.font = "11px sans-serif";
  ctx.fillStyle = "#000";
  ctx.fillText("training loss", L, 12);
  if (!points.length) {
    ctx.fillText("waiting for the first loss…", L + 10, H / 2);
    return;
  }
  const values = points.flatMap((p) => [p[1], p[2]]);
  let lo = Math.min(...values), hi = Math.max(...values);
  if (hi - lo < 1e-9) { lo -= 0.5 * Math.abs(lo || 1) * 0.1; hi += 0.5 * Math.abs(hi || 1) * 0.1; }
  const x = (step) => L + (step / Math.max(total, 1)) * (W - L - R);
  const y = (v) => H - B - ((v - lo) / (hi - lo)) * (H - T - B);
  ctx.strokeStyle = "#888";
  ctx.strokeRect(L, T, W - L - R, H - T - B);
  ctx.fillStyle = "#333";
  for (const v of ticks(lo, hi, 4)) {
    ctx.fillRect(L - 4, y(v), 4, 1);
    ctx.fillText(v.toPrecision(3), 2, y(v) + 4);
  }
  for (const s of ticks(0, total, 5)) {
    ctx.fillRect(x(s), H - B, 1, 4);
    ctx.fillText(String(Math.round(s)), x(s) - 6, H - B + 15);
  }
  ctx.fillText("step", W - R - 24, H - 3);
  ctx.strokeStyle = "#e08a00";  // sample steps
  ctx.setLineDash([3, 3]);
  for (const s of samples) { ctx.beginPath(); ctx.moveTo(x(s), T); ctx.lineTo(x(s), H - B); ctx.stroke(); }
  ctx.setLineDash([]);
  const line = (index, colour, width) => {
    ctx.strokeStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[index])) : ctx.moveTo(x(p[0]), y(p[index]))));
    ctx.stroke();
    ctx.lineWidth = 1;
  };
  line(1, "#9ec5f0", 1);  // raw: the mean of each logging interval
  line(2, "#1f4fa0", 2);  // smoothed
  ctx.fillStyle = "#1f4fa0";
  ctx.fillText(`step ${points.at(-1)[0]}/${total}: ${points.at(-1)[1].toFixed(4)} (avg ${points.at(-1)[2].toFixed(4)})`,
    L + 90, 12);
}

api.addEventListener(EVENT, ({ detail }) => {
  const node = app.graph?.getNodeById(Number(detail.node)) ?? app.graph?.getNodeById(detail.node);
  if (!node) return;
  const chart = chartOf(node);
  const last = chart.points.at(-1);
  if (detail.sample) {
    if (detail.step === 0) Object.assign(chart, { points: [], samples: [] });  // a new run samples first
    chart.samples.push(detail.step);
  } else {
    if (last && detail.step <= last[0]) Object.assign(chart, { points: [], samples: [] });  // a new run
    chart.points.push([detail.step, detail.loss, detail.smoothed]);
  }
  chart.total = detail.total;
  draw(chart);
  app.graph.setDirtyCanvas(true, true);
});

// Train LoRA's alpha follows rank while the two are equal (alpha = rank is scale 1), until the user sets alpha.
function alphaFollowsRank(node) {
  const rank = node.widgets?.find((w) => w.name === "rank");
  const alpha = node.widgets?.find((w) => w.name === "alpha");
  if (!rank || !alpha) return;
  let last = rank.value;
  const callback = rank.callback;
  rank.callback = function (value) {
    if (alpha.value === last) alpha.value = value;
    last = value;
    return callback?.apply(this, arguments);
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const out = onConfigure?.apply(this, arguments);
    last = rank.value;  // a loaded workflow's values
    return out;
  };
}

// The advanced options (inputs the server marks "advanced") fold behind one toggle; a workflow that sets one of
// them away from its default opens with them shown.
function foldAdvanced(node, nodeData) {
  const advanced = node.widgets?.filter((w) => w.options?.advanced) ?? [];
  if (!advanced.length) return;
  const toggle = node.addWidget("toggle", "advanced options", false, (on) => show(on),
    { on: "shown", off: `${advanced.length} folded`, serialize: false });
  toggle.serialize = false;  // not a value of the node: prompts leave it out; last, so saved values keep their places
  const show = (on) => {
    toggle.value = on;
    for (const w of advanced) w.hidden = !on;
    node.setSize([node.size[0], node.computeSize()[1]]);
    app.graph?.setDirtyCanvas(true, true);
  };
  show(false);
  const defaults = { ...(nodeData.input?.optional ?? {}) };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const out = onConfigure?.apply(this, arguments);
    show(advanced.some((w) => w.value !== defaults[w.name]?.[1]?.default));
    return out;
  };
}

app.registerExtension({
  name: "lora_trainer.results",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith(PREFIX)) return;
    if (nodeData.name === "LoraTrainerTrain") {
      const onNodeCreated = nodeType.prototype.onNodeCreated;
      nodeType.prototype.onNodeCreated = function () {
        const out = onNodeCreated?.apply(this, arguments);
        alphaFollowsRank(this);
        foldAdvanced(this, nodeData);
        return out;
      };
    }
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) showText(this, Array.isArray(text) ? text.join("\n") : String(text));
    };
  },
});
