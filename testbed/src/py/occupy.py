# Holds ADDRESS:PORT (udp or tcp) bound, even before the address exists
# (IP_FREEBIND), for at most 60 s. Prints "bound" once it holds it.
import socket, sys, time

kind, address, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
IP_FREEBIND = 15
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
s.bind((address, port))
if kind == "tcp":
    s.listen(1)
print("bound", flush=True)
time.sleep(60)
