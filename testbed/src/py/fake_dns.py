# A misbehaving upstream DNS server for the forwarder's tests (UDP and TCP).
# Usage: fake_dns.py MODE ADDRESS LOG
#   other-name  every answer carries the question evil.example (192.0.2.66)
#   log-ids     answers 192.0.2.100
# Every mode logs each UDP query's id ("id 1234").
#   truncate    UDP answers are empty with TC; TCP answers carry three
#               addresses (192.0.2.100-102) and log "tcp"
# Bounded: it exits after 120 s whatever happens.
import socket, struct, sys, threading, time

mode, address, log = sys.argv[1], sys.argv[2], sys.argv[3]
EVIL = b"\x04evil\x07example\x00"

def note(line):
    with open(log, "a") as f:
        f.write(line + "\n")

def question_end(q):
    i = 12
    while q[i]:
        i += 1 + q[i]
    return i + 5

def answer(q, tcp):
    end = question_end(q)
    question = q[12:end]
    count = 1
    tc = 0
    if mode == "other-name":
        question = EVIL + q[end - 4:end]
    if mode == "truncate":
        count, tc = (3, 0) if tcp else (0, 0x0200)
    last = 66 if mode == "other-name" else 100
    records = b"".join(
        b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([192, 0, 2, last + i])
        for i in range(count))
    header = q[:2] + struct.pack(">HHHHH", 0x8180 | tc, 1, count, 0, 0)
    return header + question + records

def serve_tcp():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, 53))
    listener.listen(16)
    while True:
        conn, _ = listener.accept()
        conn.settimeout(5)
        try:
            while True:
                head = conn.recv(2, socket.MSG_WAITALL)
                if len(head) < 2:
                    break
                q = conn.recv(struct.unpack(">H", head)[0], socket.MSG_WAITALL)
                note("tcp")
                a = answer(q, True)
                conn.sendall(struct.pack(">H", len(a)) + a)
        except OSError:
            pass
        conn.close()

udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.bind((address, 53))
threading.Thread(target=serve_tcp, daemon=True).start()
threading.Timer(120, lambda: __import__("os")._exit(0)).start()
time.sleep(0.2)
note("ready")
while True:
    q, peer = udp.recvfrom(4096)
    if len(q) < 17:
        continue
    note("id %04x" % struct.unpack(">H", q[:2])[0])
    udp.sendto(answer(q, False), peer)
