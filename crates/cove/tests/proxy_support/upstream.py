# A small HTTP/1.1 server run inside a sandbox by the proxy tests (standard library only).
#   GET  /info...    -> JSON: the method, path and headers it was sent
#   POST /echo       -> the request body, back
#   GET  /stream     -> "first\n", then, once /tmp/go exists, "second\n" (chunked)
#   GET  /slow       -> answers after 30 s
#   GET  /ws         -> a WebSocket that echoes every message
import base64, hashlib, json, os, socket, struct, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_body(self, body, ctype="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/ws":
            return self.websocket()
        if self.path == "/stream":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.chunk(b"first\n")
            while not os.path.exists("/tmp/go"):
                time.sleep(0.05)
            self.chunk(b"second\n")
            self.chunk(b"")
            return
        if self.path == "/slow":
            time.sleep(30)
        info = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        self.send_body(json.dumps(info).encode())

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(n)
        self.send_body(body, "application/octet-stream")

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(
            hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
        ).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        r, w = self.rfile, self.wfile
        while True:
            head = r.read(2)
            if len(head) < 2:
                return
            opcode, n = head[0] & 0x0F, head[1] & 0x7F
            if n == 126:
                n = struct.unpack(">H", r.read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", r.read(8))[0]
            mask = r.read(4) if head[1] & 0x80 else b"\0\0\0\0"
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(r.read(n)))
            if opcode == 8:
                w.write(b"\x88\x00")
                w.flush()
                return
            if opcode in (1, 2):
                if len(data) < 126:
                    w.write(bytes([0x80 | opcode, len(data)]) + data)
                else:
                    w.write(bytes([0x80 | opcode, 126]) + struct.pack(">H", len(data)) + data)
                w.flush()
        self.close_connection = True

ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
