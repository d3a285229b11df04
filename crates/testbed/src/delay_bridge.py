"""A user-space link emulator that adds a fixed one-way delay (this kernel has no netem).

Runs inside its own network namespace holding two interfaces, the inner ends of two veth pairs.
Every Ethernet frame that arrives on one is sent out of the other `delay_ms` later, so the two
outer ends behave like one link with that delay each way. Frames keep their order. The queue is
bounded (frames beyond it are dropped, as a real router's queue would).

usage: python3 delay_bridge.py IFACE_A IFACE_B DELAY_MS
"""
import collections
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
MAX_QUEUED = 20000


def main():
    iface_a, iface_b, delay_ms = sys.argv[1], sys.argv[2], float(sys.argv[3])
    delay = delay_ms / 1000.0
    socks = {}
    for name in (iface_a, iface_b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        s.bind((name, 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        socks[name] = s
    other = {iface_a: socks[iface_b], iface_b: socks[iface_a]}
    queue = collections.deque()  # (release_time, out_socket, frame), in arrival order
    by_fd = {s.fileno(): name for name, s in socks.items()}
    poller = select.poll()
    for s in socks.values():
        poller.register(s, select.POLLIN)
    print("ready", flush=True)
    while True:
        timeout = None
        if queue:
            timeout = max(0.0, (queue[0][0] - time.monotonic()) * 1000.0)
        for fd, _ in poller.poll(timeout):
            name = by_fd[fd]
            while True:
                try:
                    frame, addr = socks[name].recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING:
                    continue  # our own transmissions, seen again by the tap
                if len(queue) < MAX_QUEUED:
                    queue.append((time.monotonic() + delay, other[name], frame))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, out, frame = queue.popleft()
            try:
                out.send(frame)
            except OSError:
                pass  # oversized or interface gone: dropped, as a link would


if __name__ == "__main__":
    main()
