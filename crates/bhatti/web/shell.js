// The web shell page (served at /_shell/{id}): xterm.js attached to the
// sandbox's terminal over GET /_shell/{id}/ws. The token comes from the URL
// fragment (#token=…), which the browser never sends to the server; it goes
// in an Authorization header to /_shell/{id}/token and as a WebSocket
// subprotocol. Resize follows the window (fit addon); a dropped connection
// reconnects with backoff and reattaches the same session from the last
// output offset it saw. A reload reattaches from offset 0, so the
// session's scrollback replays.
(function () {
  "use strict";
  const statusEl = document.getElementById("status");
  const base = location.pathname.replace(/\/+$/, "");
  const id = decodeURIComponent(base.split("/").pop() || "");
  const token = new URLSearchParams(location.hash.slice(1)).get("token") || "";
  const REFUSED = "This shell link is invalid, expired or revoked.";
  const CLOSE_REVOKED = 4001;
  const storeKey = "bhatti-shell:" + id;

  const term = new Terminal({ cursorBlink: true, scrollback: 10000, convertEol: false });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("term"));
  fit.fit();
  // For tests and debugging: the terminal and its buffer.
  window.bhattiTerm = term;
  document.title = "bhatti: " + id;
  document.getElementById("title").textContent = "bhatti · " + id;

  let ws = null;
  let session = null;
  let offset = 0;
  let attempt = 0;
  let failedAttaches = 0;
  let stopped = false;
  try {
    session = sessionStorage.getItem(storeKey);
  } catch (_) {}

  function show(text, kind) {
    statusEl.textContent = text;
    statusEl.className = kind || "";
    document.body.dataset.state = kind || "";
  }

  function stop(text) {
    stopped = true;
    show(text, "error");
    term.options.disableStdin = true;
    if (ws) ws.close();
  }

  function remember(s) {
    session = s;
    try {
      if (s) sessionStorage.setItem(storeKey, s);
      else sessionStorage.removeItem(storeKey);
    } catch (_) {}
  }

  // true: live; false: refused; throws when the daemon cannot be reached.
  async function check() {
    const r = await fetch(base + "/token", {
      headers: { Authorization: "Bearer " + token },
      cache: "no-store",
    });
    if (r.status === 401 || r.status === 404) return false;
    if (!r.ok) throw new Error("HTTP " + r.status);
    return true;
  }

  function connect() {
    const q = new URLSearchParams({ rows: term.rows, cols: term.cols });
    if (session) {
      q.set("session", session);
      q.set("offset", String(offset));
    }
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const sock = new WebSocket(scheme + "//" + location.host + base + "/ws?" + q, ["bhatti-shell", token]);
    sock.binaryType = "arraybuffer";
    ws = sock;
    let opened = false;
    sock.onopen = function () {
      opened = true;
      attempt = 0;
      failedAttaches = 0;
      show("connected", "ok");
      term.focus();
    };
    sock.onmessage = function (e) {
      if (typeof e.data !== "string") {
        const b = new Uint8Array(e.data);
        offset += b.length;
        term.write(b);
        return;
      }
      let m;
      try {
        m = JSON.parse(e.data);
      } catch (_) {
        return;
      }
      if (m.type === "session") {
        remember(m.id);
        offset = m.offset;
        if (m.gap) term.write("\r\n[bhatti: some earlier output is no longer held]\r\n");
      } else if (m.type === "gap") {
        offset = m.to;
        term.write("\r\n[bhatti: output was lost while this page fell behind]\r\n");
      } else if (m.type === "exit") {
        remember(null);
        stop("The shell exited (code " + m.exit_code + "). Reload the page for a new one.");
      } else if (m.type === "error") {
        show(m.error, "warn");
      }
    };
    sock.onclose = function (e) {
      if (ws !== sock || stopped) return;
      if (e.code === CLOSE_REVOKED) {
        stop(REFUSED);
        return;
      }
      // An attach that never opened: the session may be gone; after a few
      // tries start a new one.
      if (!opened && session && ++failedAttaches >= 3) {
        remember(null);
        offset = 0;
      }
      retry();
    };
  }

  function retry() {
    attempt += 1;
    const delay = Math.min(30000, 250 * Math.pow(2, Math.min(attempt, 7)));
    show("disconnected; reconnecting in " + Math.ceil(delay / 1000) + " s", "warn");
    setTimeout(start, delay);
  }

  async function start() {
    if (stopped) return;
    let live;
    try {
      live = await check();
    } catch (_) {
      retry();
      return;
    }
    if (!live) {
      stop(REFUSED);
      return;
    }
    connect();
  }

  term.onData(function (d) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(new TextEncoder().encode(d));
  });
  term.onResize(function (size) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify({ type: "resize", rows: size.rows, cols: size.cols }));
    }
  });
  window.addEventListener("resize", function () {
    fit.fit();
  });

  if (!token) {
    stop("This link has no token (expected #token=… at its end).");
  } else {
    start();
  }
})();
