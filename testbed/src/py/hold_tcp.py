# Opens COUNT TCP connections to ADDRESS:53 and holds them for HOLD
# seconds (bounded). Prints "connected N failed M", then after a second
# "open K": how many the server has not closed.
import resource, socket, sys, time

address, count, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
want = count + 64
if soft < want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
held, failed = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((address, 53))
        held.append(s)
    except OSError:
        failed += 1
        s.close()
print("connected %d failed %d" % (len(held), failed), flush=True)
time.sleep(1)
still_open = 0
for s in held:
    s.setblocking(False)
    try:
        if s.recv(1) != b"":
            still_open += 1
    except BlockingIOError:
        still_open += 1
    except OSError:
        pass
print("open %d" % still_open, flush=True)
time.sleep(hold)
print("done", flush=True)
