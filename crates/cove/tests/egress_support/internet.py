# The egress tests' "internet", run inside a network namespace they create: HTTP on ports 80
# and 8080 of every address it has (203.0.113.10 and .11, and the addresses that sandboxes must
# never reach: 169.254.169.254, 192.168.77.10, 100.64.7.10, 172.16.7.10), answering with the
# address and port it was reached on; and DNS on 203.0.113.53, where web.test is 203.0.113.10.
import socket, socketserver, struct, threading

class Http(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.settimeout(2)
        try:
            self.request.recv(1024)
        except OSError:
            pass
        addr, port = self.request.getsockname()
        self.request.sendall(b"HTTP/1.0 200 OK\r\n\r\ninternet %s:%d\n" % (addr.encode(), port))

class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

for port in (80, 8080):
    threading.Thread(target=Server(("0.0.0.0", port), Http).serve_forever, daemon=True).start()

dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dns.bind(("203.0.113.53", 53))
print("ready", flush=True)
while True:
    q, peer = dns.recvfrom(512)
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1 : i + 1 + q[i]].decode())
        i += 1 + q[i]
    qtype = struct.unpack(">H", q[i + 1 : i + 3])[0]
    question = q[12 : i + 5]
    name = ".".join(labels).lower()
    if name == "web.test":
        answers = [b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([203, 0, 113, 10])] if qtype == 1 else []
        flags = b"\x81\x80"
    else:
        answers, flags = [], b"\x81\x83"
    head = q[:2] + flags + struct.pack(">HHHH", 1, len(answers), 0, 0)
    dns.sendto(head + question + b"".join(answers), peer)
