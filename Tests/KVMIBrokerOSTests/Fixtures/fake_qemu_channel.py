#!/usr/bin/env python3
"""Test equipment: QEMU's side of the broker channel, as a separate process whose real
/proc/PID/cmdline carries `-uuid UUID` (so the broker's identity checks see a real peer).
It speaks channel version 1 on purpose: the broker (version 2) must still accept it, and it
never says "hooked", so version 2's applied record would add nothing.

Usage: fake_qemu_channel.py SOCKET -uuid UUID MODE
  hello  HELLO, then print WELCOME or REFUSE <errno> and exit 0 (3 on end of stream)
  flood  HELLO, wait for WELCOME, print "welcome", then send EVENT frames as fast as the
         broker takes them, for at most 120 s, until killed
  exec   HELLO (VM not running), wait for WELCOME, print "welcome", then exec /bin/sh, which
         sends EVENT RESUMED on the inherited channel and sleeps: the process that asked
         is no longer the image whose identity was checked
  hook   HELLO, then print WELCOME (or REFUSE <errno> and exit), then wait for the next frame:
         print "HOOK fds=N" for a HOOK, or "closed" when the broker closes the channel
  handoff HELLO, wait for WELCOME, print "welcome pid PID", fork a child that keeps the
         channel and does what `hook` does after WELCOME, and exit at once: the pid that
         was checked is free for another process while the channel lives on

With KVMIB_FAKE_QEMU_GATE=PATH in the environment it waits (at most 60 s) until PATH exists
before it connects, so that a test can first record its pid where libvirt would.
"""
import os
import socket
import struct
import sys
import time
import uuid as uuidlib

MAGIC = 0x494D564B


def frame(kind, seq, payload):
    return struct.pack("<IHHII", MAGIC, kind, 0, seq, len(payload)) + payload


def hello(guest, running=True):
    payload = struct.pack("<HHI", 1, (1 << 3) if running else 0, os.getpid()) + guest.bytes
    payload += struct.pack("<qQB3xiii", 1_795_000_000, 0x8000_0000, 0, 1, 0, -1)
    payload += b"flooder".ljust(64, b"\0")
    return frame(0x0001, 1, payload)


def receive(sock):
    header = b""
    while len(header) < 16:
        chunk = sock.recv(16 - len(header))
        if not chunk:
            return None
        header += chunk
    _, kind, _, seq, size = struct.unpack("<IHHII", header)
    payload = b""
    while len(payload) < size:
        chunk = sock.recv(size - len(payload))
        if not chunk:
            return None
        payload += chunk
    return kind, seq, payload


def await_next_frame(sock):
    """After WELCOME: print what the broker sends next (a HOOK and its descriptors) or "closed"."""
    header, fds = b"", []
    while len(header) < 16:
        data, ancillary, _, _ = sock.recvmsg(16 - len(header), socket.CMSG_SPACE(4 * 4))
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += struct.unpack("<%di" % (len(payload) // 4), payload[: len(payload) // 4 * 4])
        if not data:
            print("closed", flush=True)
            return 0
        header += data
    _, kind, _, _, _ = struct.unpack("<IHHII", header)
    print(("HOOK fds=%d" % len(fds)) if kind == 0x0010 else ("frame 0x%x" % kind), flush=True)
    return 0


def main():
    path, flag, text, mode = sys.argv[1:5]
    assert flag == "-uuid"
    guest = uuidlib.UUID(text)
    gate = os.environ.get("KVMIB_FAKE_QEMU_GATE")
    if gate:
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(hello(guest, running=(mode != "exec")))
    answer = receive(sock)
    if answer is None:
        print("closed", flush=True)
        return 3
    kind, _, payload = answer
    if kind == 0x0003:
        print("REFUSE %d" % struct.unpack("<i", payload[:4])[0], flush=True)
        return 0
    if mode == "handoff":
        print("welcome pid %d" % os.getpid(), flush=True)
        if os.fork() == 0:
            os._exit(await_next_frame(sock))
        os._exit(0)
    print("welcome" if mode in ("flood", "exec") else "WELCOME", flush=True)
    if mode == "hook":
        return await_next_frame(sock)
    if mode == "exec":
        resumed = frame(0x0040, 1, struct.pack("<HHiqBB6x", 3, 0, 0, 1_795_000_000, 0, 1))
        escaped = "".join("\\%03o" % byte for byte in resumed)
        if sock.fileno() != 3:
            os.dup2(sock.fileno(), 3)
        os.set_inheritable(3, True)
        os.execv("/bin/sh", ["sh", "-c", "printf '%s' >&3; exec sleep 60" % escaped])
    if mode != "flood":
        return 0
    # An event kind the broker does not know: logged (rate-limited) and ignored.
    event = frame(0x0040, 1, struct.pack("<HHiqBB6x", 0x7777, 0, 0, 1_795_000_000, 0, 1))
    burst = event * 256
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        sock.sendall(burst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
