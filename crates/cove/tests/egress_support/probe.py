# Run inside a sandbox by the egress tests: tries each target given as NAME=HOST:PORT (TCP,
# a short HTTP request) or NAME=dns:HOSTNAME, and prints one JSON object of what happened:
# "open <first line of the answer>", "timeout" (dropped), "refused", "error ...", or the
# address a name resolved to.
import json, socket, sys

def tcp(host, port):
    s = socket.socket()
    s.settimeout(1.5)
    try:
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(1024)
            if not chunk:
                break
            data += chunk
        return "open " + data.decode(errors="replace").split("\r\n\r\n", 1)[-1].strip()
    except socket.timeout:
        return "timeout"
    except ConnectionRefusedError:
        return "refused"
    except OSError as e:
        return "error " + str(e.strerror)
    finally:
        s.close()

out = {}
for arg in sys.argv[1:]:
    name, target = arg.split("=", 1)
    if target.startswith("dns:"):
        try:
            out[name] = socket.gethostbyname(target[4:])
        except OSError as e:
            out[name] = "error " + str(e)
    else:
        host, port = target.rsplit(":", 1)
        out[name] = tcp(host, int(port))
print(json.dumps(out))
