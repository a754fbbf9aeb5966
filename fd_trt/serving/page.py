"""The page at ``GET /``: try the server from a browser.

A single static HTML page with an inline script: it asks for the API key (kept in the page's
memory only, never stored), a prompt, a size, a step count and a schedule, calls ``POST
/v1/generate`` with ``"format": "base64"``, and shows the image, the time it took and the batch's
Faster Diffusion counters (key steps, encoder and decoder calls). It holds no secret, so it is served
without a key; its Content-Security-Policy allows only its own script (by hash) and same-origin calls.
"""

from __future__ import annotations

import base64
import hashlib

SCRIPT = """
const $ = (id) => document.getElementById(id);
$("form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const [w, h] = $("size").value.toLowerCase().split("x").map(Number);
  const body = {prompt: $("prompt").value, width: w, height: h, steps: Number($("steps").value),
                format: "base64"};
  if ($("schedule").value.trim()) body.schedule = $("schedule").value.trim();
  const headers = {"Content-Type": "application/json"};
  if ($("key").value) headers["Authorization"] = "Bearer " + $("key").value;
  $("status").textContent = "generating...";
  $("go").disabled = true;
  const t0 = performance.now();
  try {
    const r = await fetch("/v1/generate", {method: "POST", headers, body: JSON.stringify(body)});
    const data = await r.json();
    if (!r.ok) {
      const d = data.detail;
      $("status").textContent = r.status + ": " + (Array.isArray(d) ? d.map((e) => e.msg).join("; ") : d);
      return;
    }
    const img = document.createElement("img");
    img.alt = body.prompt;
    img.src = "data:image/png;base64," + data.image;
    $("out").replaceChildren(img);
    const fd = data.fd || {};
    $("status").textContent =
      `${((performance.now() - t0) / 1000).toFixed(2)} s in the browser, ${data.latency_seconds.toFixed(2)} s ` +
      `on the server (batch of ${data.batch_size}); seed ${data.seed}; ${fd.steps} steps, ` +
      `${fd.key_steps} key steps, ${fd.encoder_calls} encoder and ${fd.decoder_calls} decoder calls ` +
      `(${fd.backend})`;
  } catch (e) {
    $("status").textContent = "request failed: " + e;
  } finally {
    $("go").disabled = false;
  }
});
"""

PAGE_HTML = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fd_trt</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }}
label {{ display: block; margin: .5rem 0; }} input {{ width: 100%; box-sizing: border-box; }}
#out img {{ image-rendering: pixelated; width: 256px; height: auto; border: 1px solid #ccc; }}
</style></head>
<body>
<h1>fd_trt</h1>
<form id="form">
<label>API key (sent with each request, never stored) <input id="key" type="password" autocomplete="off"></label>
<label>Prompt <input id="prompt" required maxlength="1000" value=""></label>
<label>Size (width x height) <input id="size" value="64x64" pattern="[0-9]+x[0-9]+"></label>
<label>Steps <input id="steps" type="number" min="1" value="20"></label>
<label>Schedule (paper, all, uniform:N, power:K, calibrated, deepcache:N; empty: the server's default)
<input id="schedule" value=""></label>
<button id="go" type="submit">Generate</button>
</form>
<p id="status"></p>
<div id="out"></div>
<script>{SCRIPT}</script>
</body></html>
"""


def content_security_policy() -> str:
    """The page's CSP: its own inline script (by sha256), same-origin calls, data: images, no framing."""
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "img-src data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    )


__all__ = ["PAGE_HTML", "SCRIPT", "content_security_policy"]
