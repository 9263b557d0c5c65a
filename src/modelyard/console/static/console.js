// modelyard console: sortable tables, copy buttons, the operator's live page and the
// playground. No framework, no inline script (the pages' CSP allows only this file).
"use strict";

(function () {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  // -- sortable tables ---------------------------------------------------------------------
  function cellValue(row, index) {
    const cell = row.children[index];
    const text = cell ? cell.textContent.trim() : "";
    const number = Number(text.replace(/[,\s]/g, ""));
    return { text, number: text !== "" && !Number.isNaN(number) ? number : null };
  }

  function sortBy(table, header) {
    const index = Array.prototype.indexOf.call(header.parentNode.children, header);
    const body = table.tBodies[0];
    if (!body) return;
    const rows = Array.from(body.rows).filter((row) => row.children.length > 1);
    const ascending = header.getAttribute("aria-sort") !== "ascending";
    const numeric = rows.every((row) => cellValue(row, index).number !== null || cellValue(row, index).text === "");
    rows.sort((a, b) => {
      const x = cellValue(a, index), y = cellValue(b, index);
      const order = numeric ? (x.number || 0) - (y.number || 0) : x.text.localeCompare(y.text);
      return ascending ? order : -order;
    });
    table.querySelectorAll("thead th").forEach((th) => th.removeAttribute("aria-sort"));
    header.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    rows.forEach((row) => body.appendChild(row));
  }

  function sortable() {
    document.querySelectorAll("table.sortable thead th button").forEach((button) => {
      button.addEventListener("click", () => sortBy(button.closest("table"), button.closest("th")));
    });
  }

  // -- copy buttons --------------------------------------------------------------------------
  function copyButtons() {
    document.querySelectorAll("[data-copy]").forEach((button) => {
      button.addEventListener("click", async () => {
        const target = document.getElementById(button.dataset.copy);
        if (!target) return;
        const text = target.textContent.trim();
        try {
          await navigator.clipboard.writeText(text);
        } catch (error) {
          const range = document.createRange();
          range.selectNodeContents(target);
          const selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          document.execCommand("copy");
        }
        button.textContent = "Copied";
        button.dataset.copied = "true";
      });
    });
  }

  // -- the operator's live page ----------------------------------------------------------------
  function live() {
    const root = document.getElementById("live");
    if (!root) return;
    let last = null;
    const set = (selector, value) => {
      const node = root.querySelector(selector);
      if (node) node.textContent = value;
    };
    async function poll() {
      let response;
      try {
        response = await fetch(root.dataset.live, { credentials: "same-origin", cache: "no-store" });
      } catch (error) {
        return;
      }
      if (response.status === 401 || response.status === 403) {
        window.location.reload();
        return;
      }
      if (!response.ok) return;
      const data = await response.json();
      if (data.engine) {
        set('[data-testid="engine-queue"]', Math.round(data.engine.queue_depth || 0));
        set('[data-testid="engine-running"]', Math.round(data.engine.running_sequences || 0));
        set('[data-testid="engine-kv"]', Math.round(data.engine.kv_cells_reserved || 0));
        const generated = data.engine.generated_tokens || 0;
        if (last && data.time > last.time) {
          const rate = Math.max(0, generated - last.generated) / (data.time - last.time);
          set('[data-testid="engine-tps"]', rate.toFixed(1));
        }
        last = { time: data.time, generated };
      }
      for (const d of data.deployments) {
        const row = root.querySelector(`tr[data-deployment="${CSS.escape(d.model + "/" + d.deployment)}"]`);
        if (!row) continue;
        const breaker = row.querySelector('[data-col="breaker"]');
        breaker.textContent = d.breaker;
        breaker.className = "breaker-" + d.breaker;
        row.querySelector('[data-col="active"]').textContent = d.active;
        for (const [outcome, count] of Object.entries(d.tries)) {
          const cell = row.querySelector(`[data-col="${outcome}"]`);
          if (cell) cell.textContent = count;
        }
      }
      root.dataset.updated = String(data.time);
    }
    poll();
    window.setInterval(poll, 2000);
  }

  // -- the playground ------------------------------------------------------------------------
  const NUMBERS = ["temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "seed", "max_tokens", "n", "thinking_budget"];
  const INTEGERS = new Set(["top_k", "seed", "max_tokens", "n", "thinking_budget"]);
  const OPENAI_ARGS = new Set(["model", "messages", "temperature", "top_p", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "stop", "n", "reasoning_effort", "response_format",
    "tools", "stream", "stream_options"]);

  function requestBody(form) {
    const field = (name) => form.querySelector(`#pg-${name}`);
    const body = { model: field("model").value, messages: [] };
    const system = field("system").value.trim();
    if (system) body.messages.push({ role: "system", content: system });
    body.messages.push({ role: "user", content: field("user").value });
    for (const name of NUMBERS) {
      const raw = field(name).value.trim();
      if (raw === "") continue;
      const value = Number(raw);
      if (Number.isNaN(value)) throw new Error(`${name} is not a number`);
      body[name] = INTEGERS.has(name) ? Math.trunc(value) : value;
    }
    const stops = field("stop").value.split("\n").filter((line) => line !== "");
    if (stops.length) body.stop = stops;
    if (field("enable_thinking").checked) body.enable_thinking = true;
    if (!field("separate_reasoning").checked) body.separate_reasoning = false;
    if (field("reasoning_effort").value) body.reasoning_effort = field("reasoning_effort").value;
    const schema = field("json_schema").value.trim();
    if (schema) {
      let parsed;
      try { parsed = JSON.parse(schema); } catch (error) { throw new Error("the JSON schema is not valid JSON"); }
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: parsed, strict: true } };
    }
    const tools = field("tools").value.trim();
    if (tools) {
      try { body.tools = JSON.parse(tools); } catch (error) { throw new Error("the tools are not valid JSON"); }
    }
    body.stream = true;
    body.stream_options = { include_usage: true };
    return body;
  }

  function python(value, indent) {
    const pad = "    ".repeat(indent + 1), end = "    ".repeat(indent);
    if (value === null) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (typeof value === "number") return String(value);
    if (typeof value === "string") return JSON.stringify(value);
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      return "[\n" + value.map((item) => pad + python(item, indent + 1)).join(",\n") + ",\n" + end + "]";
    }
    const keys = Object.keys(value);
    if (!keys.length) return "{}";
    return "{\n" + keys.map((key) => pad + JSON.stringify(key) + ": " + python(value[key], indent + 1)).join(",\n") + ",\n" + end + "}";
  }

  function code(form) {
    let body;
    try { body = requestBody(form); } catch (error) { return; }
    const origin = form.dataset.origin;
    const json = JSON.stringify(body, null, 2).replace(/'/g, "'\\''");
    form.querySelector('[data-testid="pg-code-curl"]').textContent =
      `curl ${origin}/v1/chat/completions \\\n  -H "Authorization: Bearer $MODELYARD_API_KEY" \\\n` +
      `  -H "Content-Type: application/json" \\\n  -d '${json}'`;
    const args = [], extra = {};
    for (const [key, value] of Object.entries(body)) {
      if (OPENAI_ARGS.has(key)) args.push(`    ${key}=${python(value, 1)},`);
      else extra[key] = value;
    }
    if (Object.keys(extra).length) args.push(`    extra_body=${python(extra, 1)},`);
    form.querySelector('[data-testid="pg-code-python"]').textContent =
      `import os\n\nfrom openai import OpenAI\n\nclient = OpenAI(base_url="${origin}/v1", ` +
      `api_key=os.environ["MODELYARD_API_KEY"])\nstream = client.chat.completions.create(\n` +
      args.join("\n") + "\n)\nfor chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n" +
      "        print(chunk.choices[0].delta.content, end=\"\", flush=True)\n";
  }

  function cost(option, usage) {
    const prompt = usage.prompt_tokens || 0;
    const cached = Math.min((usage.prompt_tokens_details || {}).cached_tokens || 0, prompt);
    const completion = usage.completion_tokens || 0;
    const total = (prompt - cached) * Number(option.dataset.input) + cached * Number(option.dataset.cached) +
      completion * Number(option.dataset.output);
    return (Math.ceil(total / 1e6) / 1e6).toFixed(6);
  }

  function playground() {
    const form = document.getElementById("playground-form");
    if (!form) return;
    const out = (id) => form.querySelector(`[data-testid="${id}"]`);
    const send = out("pg-send"), stop = out("pg-stop"), error = out("pg-error");
    let controller = null;
    form.addEventListener("input", () => code(form));
    form.addEventListener("change", () => code(form));
    code(form);
    stop.addEventListener("click", () => { if (controller) controller.abort(); });

    function fail(message) {
      error.textContent = message;
      error.hidden = false;
      form.dataset.state = "error";
    }

    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      let body;
      try { body = requestBody(form); } catch (problem) { fail(problem.message); return; }
      const option = form.querySelector("#pg-model").selectedOptions[0];
      error.hidden = true;
      for (const id of ["pg-output", "pg-reasoning"]) out(id).textContent = "";
      for (const id of ["pg-ttft", "pg-tps", "pg-usage", "pg-cost"]) out(id).textContent = "–";
      form.dataset.state = "streaming";
      send.disabled = true;
      stop.disabled = false;
      controller = new AbortController();
      const started = performance.now();
      let first = null, usage = null, chunks = 0;
      const answers = [], reasonings = [], tools = [];
      const show = () => {
        const label = (i) => (answers.length > 1 ? `— choice ${i} —\n` : "");
        out("pg-output").textContent = answers.map((text, i) => label(i) + (text || "") +
          (tools[i] ? "\n" + JSON.stringify(tools[i], null, 2) : "")).join("\n\n");
        out("pg-reasoning").textContent = reasonings.filter(Boolean).join("\n\n");
        if (reasonings.some(Boolean)) out("pg-reasoning-box").open = true;
      };
      try {
        const response = await fetch("/v1/chat/completions", {
          method: "POST", credentials: "same-origin", signal: controller.signal,
          headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
          body: JSON.stringify(body),
        });
        if (!response.ok) {
          let message = `HTTP ${response.status}`;
          try { message += ": " + (await response.json()).error.message; } catch (ignored) { /* not JSON */ }
          throw new Error(message);
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "", done = false;
        while (!done) {
          const part = await reader.read();
          if (part.done) break;
          buffer += decoder.decode(part.value, { stream: true }).replace(/\r\n/g, "\n");
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const data = block.split("\n").filter((line) => line.startsWith("data:"))
              .map((line) => line.slice(5).trimStart()).join("\n");
            if (!data) continue;
            if (data === "[DONE]") { done = true; break; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              const delta = choice.delta || {}, i = choice.index || 0;
              if (delta.content || delta.reasoning_content || delta.tool_calls) {
                if (first === null) {
                  first = performance.now();
                  out("pg-ttft").textContent = Math.round(first - started);
                }
                chunks += 1;
              }
              if (delta.content) answers[i] = (answers[i] || "") + delta.content;
              if (delta.reasoning_content) reasonings[i] = (reasonings[i] || "") + delta.reasoning_content;
              for (const call of delta.tool_calls || []) {
                const calls = tools[i] = tools[i] || [];
                const held = calls[call.index || 0] = calls[call.index || 0] || { name: "", arguments: "" };
                if (call.function && call.function.name) held.name += call.function.name;
                if (call.function && call.function.arguments) held.arguments += call.function.arguments;
              }
              if (answers[i] === undefined) answers[i] = "";
            }
            show();
          }
        }
        const ended = performance.now();
        const tokens = usage ? usage.completion_tokens : chunks;
        if (first !== null && ended > first) out("pg-tps").textContent = (tokens / ((ended - first) / 1000)).toFixed(1);
        if (usage) {
          const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
          const reasoning = (usage.completion_tokens_details || {}).reasoning_tokens || 0;
          out("pg-usage").textContent = `${usage.prompt_tokens} prompt (${cached} cached), ` +
            `${usage.completion_tokens} completion (${reasoning} reasoning)`;
          out("pg-cost").textContent = cost(option, usage);
        }
        form.dataset.state = "done";
      } catch (problem) {
        fail(problem.name === "AbortError" ? "Stopped." : problem.message);
      } finally {
        send.disabled = false;
        stop.disabled = true;
        controller = null;
      }
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    sortable();
    copyButtons();
    live();
    playground();
  });
})();
