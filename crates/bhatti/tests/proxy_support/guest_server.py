# A test server for the guest: plain HTTP, a POST digest, server-sent events
# gated on a file, and a WebSocket echo (stdlib only: the rootfs has no
# third-party Python packages).
import base64, hashlib, http.server, os, socketserver, struct, time

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, code, body, ctype="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path.startswith("/sse"):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"data: one\n\n")
            self.wfile.flush()
            while not os.path.exists("/tmp/sse-go"):
                time.sleep(0.05)
            self.wfile.write(b"data: two\n\n")
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path.startswith("/kib"):
            return self.reply(200, b"k" * 1024)
        body = "path=%s auth=%s prefix=%s host=%s" % (
            self.path,
            self.headers.get("Authorization"),
            self.headers.get("X-Forwarded-Prefix"),
            self.headers.get("Host"),
        )
        self.reply(200, body.encode())

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        self.reply(200, ("got %d sha256=%s" % (n, hashlib.sha256(data).hexdigest())).encode())

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            h = r.read(2)
            if len(h) < 2:
                return
            op, n = h[0] & 0x0F, h[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", r.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if h[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if op == 8:
                w.write(b"\x88\x00")
                w.flush()
                self.close_connection = True
                return
            if op in (1, 2):
                out = b"echo:" + data
                hdr = bytes([0x80 | op])
                if len(out) < 126:
                    hdr += bytes([len(out)])
                elif len(out) < 65536:
                    hdr += bytes([126]) + struct.pack(">H", len(out))
                else:
                    hdr += bytes([127]) + struct.pack(">Q", len(out))
                w.write(hdr + out)
                w.flush()


class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


S(("0.0.0.0", 8000), H).serve_forever()
