# Sends COUNT A queries for q<i>.SUFFIX over UDP to ADDRESS:53, all with
# the same id ID (hex), one after another, each waiting up to 3 s. Prints
# one line per query: "answer ID RCODE ANCOUNT" or "timeout".
import socket, struct, sys

address, count, suffix, qid = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4], 16)
for i in range(count):
    name = b"".join(bytes([len(l)]) + l for l in ("q%d.%s" % (i, suffix)).encode().split(b"."))
    query = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + b"\x00" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    s.sendto(query, (address, 53))
    try:
        reply = s.recv(4096)
        rid, flags, _, ancount = struct.unpack(">HHHH", reply[:8])
        print("answer %04x %d %d" % (rid, flags & 0xF, ancount), flush=True)
    except socket.timeout:
        print("timeout", flush=True)
    s.close()
