#!/usr/bin/env python3
#
# channel-test.py: run a patched qemu-system-x86_64 against a scripted
# broker and check QEMU's side of Documentation/channel-protocol.md.
#
# usage: channel-test.py QEMU [--kernel-double LIB.so] [-k PATTERN] [-v]
#
# Without a KVMI kernel the HOOK ioctl fails with the kernel's real errno
# (ENOTTY on stock kernels); those tests always run.  The tests of the
# hooked path (PREUNHOOK waits, hang-up, migration gate) need a kernel
# double preloaded into QEMU that fakes the five introspection ioctls;
# pass it with --kernel-double (it must accept HOOK with a socket fd,
# answer PREUNHOOK with 0 and UNHOOK with 0).
#
# Needs: python3, /dev/kvm, Debian's seabios (-L /usr/share/seabios).
# SPDX-License-Identifier: GPL-2.0-or-later

import argparse
import array
import errno
import json
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid as uuidlib

MAGIC = 0x494D564B
HELLO, WELCOME, REFUSE = 0x1, 0x2, 0x3
HOOK, SET_ALLOWED, PREUNHOOK, UNHOOK, RELEASE = 0x10, 0x11, 0x12, 0x13, 0x14
EVENT, RESULT = 0x40, 0x80
STEPS = {0: 'NONE', 1: 'HOOK', 2: 'COMMAND', 3: 'EVENT', 4: 'PREUNHOOK',
         5: 'UNHOOK', 6: 'FD', 7: 'STATE', 8: 'REQUEST'}
EVENTS = {1: 'TOOL_HANGUP', 2: 'PAUSED', 3: 'RESUMED', 4: 'MIGRATION_OUT',
          5: 'MIGRATION_FAILED', 6: 'MIGRATION_IN', 7: 'RESET',
          8: 'SHUTDOWN', 9: 'SAVEVM', 10: 'REQUIRED_TIMEOUT'}

VERBOSE = False


def log(*a):
    if VERBOSE:
        print('   ', *a, flush=True)


class Fail(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Fail(what)


class Channel:
    """The broker's end of one QEMU connection."""

    def __init__(self, conn):
        self.sock = conn
        self.seq = 0
        self.pending = []       # messages read but not consumed yet

    def close(self):
        self.sock.close()

    def send(self, mtype, payload=b'', fds=(), seq=None, magic=MAGIC,
             size=None):
        if seq is None:
            self.seq += 1
            seq = self.seq
        hdr = struct.pack('<IHHII', magic, mtype, 0, seq,
                          len(payload) if size is None else size)
        data = hdr + payload
        if fds:
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                    array.array('i', fds).tobytes())]
            self.sock.sendmsg([data], anc)
        else:
            self.sock.sendall(data)
        return seq

    def _recv_exact(self, n, deadline):
        buf = b''
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Fail('timeout reading from QEMU')
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(n - len(buf))
            except socket.timeout:
                raise Fail('timeout reading from QEMU')
            if not chunk:
                raise EOFError('QEMU closed the channel')
            buf += chunk
        return buf

    def read_msg(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        hdr = self._recv_exact(16, deadline)
        magic, mtype, flags, seq, size = struct.unpack('<IHHII', hdr)
        check(magic == MAGIC, 'bad magic from QEMU')
        check(size <= 4096, 'oversized message from QEMU')
        payload = self._recv_exact(size, deadline) if size else b''
        msg = {'type': mtype, 'seq': seq, 'payload': payload}
        if mtype == EVENT:
            kind, _, err, st, hooked, running = struct.unpack(
                '<HHIqBB', payload[:18])
            msg.update(kind=EVENTS.get(kind, kind), error=err,
                       start_time=st, hooked=hooked, running=running)
        elif mtype == RESULT:
            rtype, step, hooked, err, fid = struct.unpack('<HBBIi',
                                                          payload[:12])
            msg.update(request_type=rtype, step=STEPS.get(step, step),
                       hooked=hooked, error=err, failed_id=fid)
        elif mtype == HELLO:
            p = payload
            (ver, flags, pid) = struct.unpack('<HHI', p[:8])
            msg.update(version=ver, flags=flags, pid=pid,
                       uuid=str(uuidlib.UUID(bytes=p[8:24])),
                       start_time=struct.unpack('<q', p[24:32])[0],
                       max_gpa=struct.unpack('<Q', p[32:40])[0],
                       hooked_abi=p[40],
                       cap_v12=struct.unpack('<i', p[44:48])[0],
                       cap_v7=struct.unpack('<i', p[48:52])[0],
                       param=struct.unpack('<i', p[52:56])[0],
                       name=p[56:120].split(b'\0')[0].decode(),
                       size=len(p),
                       applied=p[120:184] if ver >= 2 else None)
        log('<-', {k: v for k, v in msg.items() if k != 'payload'})
        return msg

    def expect(self, mtype, timeout=10.0, **fields):
        """Next message of mtype (others are kept for later)."""
        for i, m in enumerate(self.pending):
            if m['type'] == mtype and all(m.get(k) == v
                                          for k, v in fields.items()):
                return self.pending.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            m = self.read_msg(max(0.01, deadline - time.monotonic()))
            if m['type'] == mtype and all(m.get(k) == v
                                          for k, v in fields.items()):
                return m
            self.pending.append(m)

    def event(self, kind, timeout=10.0):
        return self.expect(EVENT, timeout, kind=kind)

    def request(self, mtype, payload=b'', fds=(), timeout=10.0):
        seq = self.send(mtype, payload, fds)
        r = self.expect(RESULT, timeout)
        check(r['seq'] == seq, 'RESULT seq %d != %d' % (r['seq'], seq))
        check(r['request_type'] == mtype, 'RESULT for the wrong type')
        return r

    def assert_closed(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.read_msg(max(0.01, deadline - time.monotonic()))
        except EOFError:
            return
        except (ConnectionResetError, Fail):
            if time.monotonic() >= deadline:
                raise Fail('QEMU did not close the channel')


def lists(abi=12, commands=(-1,), events=(-1,)):
    ids = list(commands) + list(events)
    return struct.pack('<BBHHH', abi, 0, len(commands), len(events), 0) + \
        struct.pack('<%di' % len(ids), *ids)


class QMP:
    def __init__(self, path, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.sock.makefile('rwb', buffering=0)
        self.events = []
        self._read()
        self.cmd('qmp_capabilities')

    def _read(self):
        line = self.f.readline()
        if not line:
            raise EOFError('QMP closed')
        return json.loads(line)

    def cmd(self, name, timeout=30.0, **args):
        msg = {'execute': name}
        if args:
            msg['arguments'] = args
        self.sock.settimeout(timeout)
        self.f.write(json.dumps(msg).encode() + b'\n')
        while True:
            r = self._read()
            if 'event' in r:
                self.events.append(r)
                continue
            if 'error' in r:
                raise Fail('QMP %s: %s' % (name, r['error']))
            return r['return']

    def status(self):
        return self.cmd('query-status')['status']

    def close(self):
        self.sock.close()


class Env:
    def __init__(self, qemu, double):
        self.qemu = qemu
        self.double = double
        self.dir = tempfile.mkdtemp(prefix='ib-test-')
        self.sock_path = os.path.join(self.dir, 'broker.sock')
        self.listener = None
        self.procs = []

    def listen(self):
        if self.listener:
            self.listener.close()
        if os.path.exists(self.sock_path):
            os.unlink(self.sock_path)
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.sock_path)
        self.listener.listen(8)

    def accept(self, timeout=10.0):
        self.listener.settimeout(timeout)
        try:
            conn, _ = self.listener.accept()
        except socket.timeout:
            raise Fail('QEMU did not connect within %s s' % timeout)
        conn.settimeout(None)
        return Channel(conn)

    def start(self, obj_opts='', extra=(), stopped=True, name='demo',
              uid=None, qmp_name='qmp', double=False, env_extra=None,
              qemu=None, broker=True):
        """broker=False: no -chardev/-object (the host-wide file's turn)"""
        uid = uid or str(uuidlib.uuid4())
        qmp_path = os.path.join(self.dir, qmp_name + '.sock')
        args = [qemu or self.qemu, '-accel', 'kvm',
                '-L', '/usr/share/seabios',
                '-m', '64', '-display', 'none', '-nodefaults',
                '-uuid', uid, '-name', 'guest=' + name]
        if broker:
            args += ['-chardev', 'socket,id=chr0,path=%s,reconnect-ms=500'
                     % self.sock_path,
                     '-object', 'introspection-broker,id=vmi0,chardev=chr0' +
                     obj_opts]
        args += ['-qmp', 'unix:%s,server=on,wait=off' % qmp_path]
        if stopped:
            args.append('-S')
        args += list(extra)
        env = dict(os.environ)
        if double:
            env['LD_PRELOAD'] = self.double
        env.update(env_extra or {})
        errf = open(os.path.join(self.dir, qmp_name + '.stderr'), 'w+')
        p = subprocess.Popen(args, stdout=errf, stderr=errf, env=env)
        p.errf = errf
        p.uid = uid
        self.procs.append(p)
        return p, QMP(qmp_path)

    def stderr(self, p):
        if not hasattr(p, 'errf'):
            return ''
        p.errf.flush()
        p.errf.seek(0)
        return p.errf.read()

    def stop(self, p):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def cleanup(self):
        for p in self.procs:
            self.stop(p)
        if self.listener:
            self.listener.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def host_wide_qemu(env, conf):
    """
    The patched QEMU with a host-wide introspection-broker.conf of its
    own: a link to the binary beside a qemu-bundle/ tree, which QEMU
    reads instead of the installed paths (its convention for running
    from a build tree), so the host's /etc/qemu is never touched.
    conf=None: no file.
    """
    d = tempfile.mkdtemp(prefix='host-wide-', dir=env.dir)
    qemu = os.path.join(d, 'qemu-system-x86_64')
    try:
        os.link(env.qemu, qemu)
    except OSError:
        shutil.copy2(env.qemu, qemu)
    etc = os.path.join(d, 'qemu-bundle', 'etc', 'qemu')
    os.makedirs(etc)
    share = os.path.join(d, 'qemu-bundle', 'usr', 'share')
    os.makedirs(share)
    for fw in ('seabios', 'qemu'):
        os.symlink('/usr/share/' + fw, os.path.join(share, fw))
    if conf is not None:
        with open(os.path.join(etc, 'introspection-broker.conf'), 'w') as f:
            f.write(conf)
    return qemu, os.path.join(etc, 'introspection-broker.conf')


def host_conf(path, extra=''):
    return ('# host-wide\n[introspection-broker]\n  enabled = "on"\n'
            '  path = "%s"\n  reconnect-ms = "500"\n%s' % (path, extra))


def objects(qmp):
    """The ids of the introspection-broker objects and of the chardevs"""
    objs = [o['name'] for o in qmp.cmd('qom-list', path='/objects')
            if o['type'] == 'child<introspection-broker>']
    chrs = [c['label'] for c in qmp.cmd('query-chardev')]
    return objs, chrs


def handshake(env, p=None, timeout=10.0, version=1):
    ch = env.accept(timeout)
    h = ch.expect(HELLO)
    ch.send(WELCOME, struct.pack('<HHI', version, 0, 0), seq=0)
    return ch, h


NO_APPLIED = bytes(64)


def applied(tool_id, digest):
    """Version 2's tail of HOOK and SET_ALLOWED: 32-byte id, 32-byte digest"""
    return bytes([tool_id]) * 32 + bytes([digest]) * 32


def tool_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return a, b


# ---------------------------------------------------------------- tests

def t_hello(env):
    """HELLO carries identity, state and the capability probe"""
    env.listen()
    p, qmp = env.start()
    ch, h = handshake(env)
    check(h['version'] == 2, 'version')
    check(h['size'] == 184, 'version 2 HELLO is 184 bytes')
    check(h['applied'] == NO_APPLIED, 'nothing applied yet')
    check(h['pid'] == p.pid, 'pid %d != %d' % (h['pid'], p.pid))
    check(h['uuid'] == p.uid, 'uuid')
    check(h['name'] == 'demo', 'name')
    check(abs(h['start_time'] - time.time()) < 30, 'start_time')
    check(h['max_gpa'] == 64 << 20, 'max_gpa %#x' % h['max_gpa'])
    check(h['flags'] == 0, 'flags %#x (paused, not hooked)' % h['flags'])
    check(h['hooked_abi'] == 0, 'hooked_abi')
    check(h['param'] in (-1, 0, 1), 'param')
    print('    HELLO: cap_v12=%d cap_v7=%d param=%d max_gpa=%#x' %
          (h['cap_v12'], h['cap_v7'], h['param'], h['max_gpa']))
    ch.close()
    env.stop(p)


def t_config_errors(env):
    """bad object configurations are refused at start-up"""
    env.listen()
    other = os.path.join(env.dir, 'other.sock')
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(other)
    lsock.listen(8)
    base = [env.qemu, '-accel', 'kvm', '-L', '/usr/share/seabios', '-m',
            '64', '-display', 'none', '-nodefaults', '-S']
    cases = [
        ([], 'chardev=nochr', "chardev 'nochr' not found"),
        (['-chardev', 'socket,id=c,path=%s,server=on,wait=off' %
          os.path.join(env.dir, 's.sock')], 'chardev=c',
         'must be a client socket'),
        (['-chardev', 'socket,id=c,path=%s' % other], 'chardev=c',
         'must be a client socket'),
        (['-chardev', 'socket,id=c,host=127.0.0.1,port=1,reconnect-ms=1000'],
         'chardev=c', 'must be a unix socket'),
        (['-chardev', 'null,id=c'], 'chardev=c', 'is not a socket'),
        (['-chardev', 'socket,id=c,path=%s,reconnect-ms=1000' %
          other], 'chardev=c,unhook-timeout=0', 'at least 1'),
        (['-chardev', 'socket,id=c,path=%s,reconnect-ms=1000' %
          other], 'chardev=c,shutdown-timeout=0', 'at least 1'),
    ]
    for extra, opts, msg in cases:
        r = subprocess.run(base + extra + ['-object',
                           'introspection-broker,id=v,' + opts],
                           capture_output=True, text=True, timeout=20)
        check(r.returncode != 0 and msg in r.stderr,
              '%s: rc=%d %s' % (opts, r.returncode, r.stderr.strip()))
    # two objects
    r = subprocess.run(base + ['-chardev', 'socket,id=c,path=%s,'
                               'reconnect-ms=1000' % other,
                               '-chardev', 'socket,id=d,path=%s,'
                               'reconnect-ms=1000' % other,
                               '-object', 'introspection-broker,id=a,'
                               'chardev=c', '-object',
                               'introspection-broker,id=b,chardev=d'],
                       capture_output=True, text=True, timeout=20)
    check(r.returncode != 0 and 'only one' in r.stderr, r.stderr)
    lsock.close()
    # the deprecated reconnect=N (seconds) is accepted
    args = base + ['-chardev', 'socket,id=c,path=%s,reconnect=1' %
                   env.sock_path, '-object',
                   'introspection-broker,id=v,chardev=c']
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    env.procs.append(p)
    ch = env.accept()
    ch.expect(HELLO)
    ch.close()
    env.stop(p)


def t_host_wide(env):
    """host-wide file: QEMU connects by itself; off or absent: nothing"""
    env.listen()
    qemu, conf = host_wide_qemu(env, host_conf(env.sock_path))
    p, qmp = env.start(qemu=qemu, broker=False)
    ch, h = handshake(env)
    check(h['pid'] == p.pid and h['uuid'] == p.uid and h['name'] == 'demo',
          'HELLO names this QEMU: %r' % h)
    check(h['flags'] == 0, 'flags %#x (paused, not required)' % h['flags'])
    check(objects(qmp)[0] == ['introspection-broker-host'],
          'objects %r' % (objects(qmp),))
    check('connecting to the broker at %s (host-wide, %s)'
          % (env.sock_path, conf) in env.stderr(p), env.stderr(p))
    # the broker's requests work as with an explicit object
    a, b = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check((r['step'], r['error']) == ('STATE', errno.EBUSY), r)
    check(ch.request(RELEASE)['error'] == 0, 'RELEASE')
    ch.close()
    env.stop(p)
    # required=on and a timeout from the file reach the object
    qemu, _ = host_wide_qemu(env, host_conf(
        env.sock_path, '  required = "on"\n  unhook-timeout = "7"\n'))
    p, qmp = env.start(qemu=qemu, broker=False, qmp_name='qmp-required')
    ch, h = handshake(env)
    check(h['flags'] & 6 == 6, 'REQUIRED|HELD %#x' % h['flags'])
    check(qmp.cmd('qom-get', path='/objects/introspection-broker-host',
                  property='unhook-timeout') == 7, 'unhook-timeout')
    ch.close()
    env.stop(p)
    for name, text in (('off', host_conf(env.sock_path).replace(
                            '"on"', '"off"')),
                       ('absent', None)):
        qemu, _ = host_wide_qemu(env, text)
        p, qmp = env.start(qemu=qemu, broker=False, qmp_name='qmp-' + name)
        check(objects(qmp)[0] == [], '%s: objects %r' % (name, objects(qmp)))
        check(all('introspection' not in c for c in objects(qmp)[1]),
              '%s: chardevs %r' % (name, objects(qmp)[1]))
        env.stop(p)


def t_host_wide_explicit(env):
    """an explicit object wins over the host-wide file: one connection"""
    env.listen()
    other = os.path.join(env.dir, 'host-wide.sock')
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(other)
    lsock.listen(8)
    lsock.setblocking(False)
    qemu, _ = host_wide_qemu(env, host_conf(other))
    p, qmp = env.start(qemu=qemu)
    ch, h = handshake(env)
    check(h['pid'] == p.pid, 'HELLO from this QEMU on the explicit chardev')
    objs, chrs = objects(qmp)
    check(objs == ['vmi0'], 'objects %r' % objs)
    check('introspection-broker-host' not in chrs, 'chardevs %r' % chrs)
    # The object and its chardev are created at start-up, before QMP
    # answers: no host-wide chardev means nothing will connect there.
    try:
        lsock.accept()
        raise Fail('QEMU also connected to the host-wide socket')
    except BlockingIOError:
        pass
    lsock.close()
    ch.close()
    env.stop(p)


def t_host_wide_no_broker(env):
    """host-wide file, no broker: the guest runs; the broker comes later"""
    absent = os.path.join(env.dir, 'later.sock')
    qemu, _ = host_wide_qemu(env, host_conf(absent))
    p, qmp = env.start(qemu=qemu, broker=False, stopped=False)
    check(qmp.status() == 'running', 'status %s' % qmp.status())
    check(objects(qmp)[0] == ['introspection-broker-host'], 'object')
    env.sock_path = absent
    env.listen()
    ch, h = handshake(env)
    check(h['pid'] == p.pid and h['flags'] & 8, 'HELLO says running')
    ch.close()
    env.stop(p)


def t_host_wide_errors(env):
    """a bad host-wide file stops QEMU naming file:line; -uuid/KVM gate"""
    env.listen()
    good = host_conf(env.sock_path)
    cases = [
        (good + '  colour = "red"\n', ":6: unknown key 'colour'"),
        (good + '  path = "/x"\n', ":6: 'path' is set twice"),
        (good + 'path /x\n', ':6: parse error'),
        ('path = "/x"\n', ":1: 'path' outside the [introspection-broker]"),
        ('[chardev "x"]\n', ':1: unknown group'),
        (good.replace('"on"', '"maybe"'), ':3: Parameter \'enabled\''),
        (good.replace(env.sock_path, 'relative.sock'), ":4: 'path' must"),
        (good + '  unhook-timeout = "0"\n', ':6: property \'unhook-timeout\''
         ' must be at least 1'),
        (good + '  required = "perhaps"\n', ':6: '),
        (good.replace('"500"', '"0"'), 'must be a client socket'),
    ]
    for text, msg in cases:
        qemu, conf = host_wide_qemu(env, text)
        r = subprocess.run([qemu, '-accel', 'kvm', '-m', '64', '-display',
                            'none', '-nodefaults', '-S', '-uuid',
                            str(uuidlib.uuid4())],
                           capture_output=True, text=True, timeout=20)
        where = conf + msg if msg.startswith(':') else conf
        check(r.returncode != 0 and where in r.stderr and msg in r.stderr,
              '%r: rc=%d %s' % (text, r.returncode, r.stderr.strip()))
    qemu, conf = host_wide_qemu(env, good)
    os.chmod(conf, 0)
    if os.geteuid() != 0:
        r = subprocess.run([qemu, '-accel', 'kvm', '-nodefaults', '-S',
                            '-display', 'none', '-uuid',
                            str(uuidlib.uuid4())],
                           capture_output=True, text=True, timeout=20)
        check(r.returncode != 0 and 'cannot open ' + conf in r.stderr,
              r.stderr)
    os.chmod(conf, 0o644)
    # Not enrolled: a QEMU without -uuid (libvirt's capability probe) and
    # a TCG guest
    for extra, name in ((['-machine', 'none'], 'no-uuid'),
                        (['-uuid', str(uuidlib.uuid4())], 'tcg')):
        qmp_path = os.path.join(env.dir, name + '.sock')
        accel = 'tcg' if name == 'tcg' else 'kvm'
        p = subprocess.Popen([qemu, '-accel', accel, '-nodefaults', '-S',
                              '-display', 'none', '-qmp',
                              'unix:%s,server=on,wait=off' % qmp_path] +
                             extra, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        env.procs.append(p)
        qmp = QMP(qmp_path)
        check(objects(qmp)[0] == [], '%s: objects %r' % (name, objects(qmp)))
        env.stop(p)


def t_hook_real_kernel(env):
    """HOOK gets the kernel's errno (step HOOK); state checks; FD checks"""
    env.listen()
    p, qmp = env.start()
    ch, h = handshake(env)
    a, b = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check((r['step'], r['error']) == ('STATE', errno.EBUSY),
          'HOOK while paused (-S): %s' % r)
    qmp.cmd('cont')
    ev = ch.event('RESUMED')
    check(ev['running'] == 1 and ev['hooked'] == 0, 'RESUMED fields')
    for abi in (12, 7):
        r = ch.request(HOOK, lists(abi), fds=[a.fileno()])
        check(r['step'] == 'HOOK' and r['hooked'] == 0,
              'HOOK v%d: %s' % (abi, r))
        print('    HOOK v%d on this kernel: errno %d (%s)' %
              (abi, r['error'], os.strerror(r['error'])))
        check(r['error'] == errno.ENOTTY, 'expected ENOTTY')
    r = ch.request(HOOK, lists())
    check((r['step'], r['error']) == ('FD', errno.EBADF), 'no fd: %s' % r)
    r = ch.request(HOOK, lists(), fds=[a.fileno(), b.fileno()])
    check((r['step'], r['error']) == ('FD', errno.EBADF), 'two fds: %s' % r)
    r = ch.request(HOOK, lists(abi=9), fds=[a.fileno()])
    check((r['step'], r['error']) == ('REQUEST', errno.EINVAL), 'abi 9')
    r = ch.request(HOOK, lists(commands=[1] * 65), fds=[a.fileno()])
    check((r['step'], r['error']) == ('REQUEST', errno.EINVAL), '65 ids')
    r = ch.request(0x99)
    check((r['step'], r['error']) == ('REQUEST', errno.ENOSYS), 'unknown')
    r = ch.request(SET_ALLOWED, lists())
    check((r['step'], r['error']) == ('STATE', errno.ENOTCONN),
          'SET_ALLOWED unhooked: %s' % r)
    r = ch.request(PREUNHOOK)
    check((r['step'], r['error']) == ('STATE', errno.ENOTCONN), 'PREUNHOOK')
    r = ch.request(UNHOOK)
    check((r['step'], r['error']) == ('NONE', 0), 'UNHOOK idempotent')
    r = ch.request(RELEASE)
    check((r['step'], r['error']) == ('NONE', 0), 'RELEASE no-op')
    # the channel is still alive and QEMU did not leak the fds it got
    fds = len(os.listdir('/proc/%d/fd' % p.pid))
    for _ in range(5):
        ch.request(HOOK, lists(), fds=[a.fileno()])
    check(len(os.listdir('/proc/%d/fd' % p.pid)) == fds, 'fd leak')
    ch.close()
    env.stop(p)


def t_stop_cont_reset(env):
    """stop/cont give PAUSED/RESUMED; system_reset gives a new start_time"""
    env.listen()
    p, qmp = env.start(stopped=False)
    ch, h = handshake(env)
    check(h['flags'] & 8, 'RUNNING flag')
    qmp.cmd('stop')
    ev = ch.event('PAUSED')
    check(ev['running'] == 0, 'PAUSED running=0')
    qmp.cmd('cont')
    ev = ch.event('RESUMED')
    check(ev['running'] == 1, 'RESUMED running=1')
    t0 = ev['start_time']
    time.sleep(1.2)
    qmp.cmd('system_reset')
    ev = ch.event('RESET')
    check(ev['start_time'] > t0, 'RESET start_time %d !> %d' %
          (ev['start_time'], t0))
    ch.close()
    env.stop(p)


def t_reconnect(env):
    """a broker restart gets a new HELLO; REFUSE and protocol errors"""
    env.listen()
    p, qmp = env.start(stopped=False)
    ch, h1 = handshake(env)
    ch.close()
    env.listener.close()
    env.listener = None
    time.sleep(1)
    env.listen()
    ch, h2 = handshake(env, timeout=5)
    check(h2['start_time'] == h1['start_time'], 'start_time kept')
    check(h2['pid'] == p.pid, 'same QEMU')
    # REFUSE: QEMU logs the reason and reconnects later
    ch.close()
    ch = env.accept()
    ch.expect(HELLO)
    ch.send(REFUSE, struct.pack('<i', errno.EPERM) + b'uuid mismatch',
            seq=0)
    ch.assert_closed()
    ch = env.accept()
    ch.expect(HELLO)
    check('uuid mismatch' in env.stderr(p), 'REFUSE text logged')
    # bad magic closes the channel
    ch.send(WELCOME, struct.pack('<HHI', 1, 0, 0), seq=0)
    ch.send(UNHOOK, magic=0x12345678)
    ch.assert_closed()
    ch, _ = handshake(env)
    # oversized payload closes the channel
    ch.send(UNHOOK, size=4097)
    ch.assert_closed()
    ch, _ = handshake(env)
    # an fd on a message other than HOOK closes the channel
    a, b = tool_pair()
    ch.send(UNHOOK, fds=[a.fileno()])
    ch.assert_closed()
    ch, _ = handshake(env)
    r = ch.request(UNHOOK)
    check(r['error'] == 0, 'still serving after errors')
    ch.close()
    env.stop(p)


def timed(what, fn, bound):
    """fn() must return within bound seconds; returns its duration"""
    t0 = time.monotonic()
    try:
        fn()
    except Fail as e:
        raise Fail('%s: %s (main loop blocked?)' % (what, e))
    except OSError as e:
        raise Fail('%s: no answer within %s s (main loop blocked?): %s' %
                   (what, bound, e))
    dt = time.monotonic() - t0
    check(dt < bound, '%s took %.1f s (main loop blocked?)' % (what, dt))
    return dt


def pause_resume(qmp, bound=5.0):
    """one stop/cont cycle (PAUSED, RESUMED) and a query-status, each
    answered within bound; returns the slowest answer"""
    return max(timed('stop', lambda: qmp.cmd('stop', timeout=bound), bound),
               timed('cont', lambda: qmp.cmd('cont', timeout=bound), bound),
               timed('query-status',
                     lambda: qmp.cmd('query-status', timeout=bound), bound))


def t_slow_broker(env):
    """a broker that reads late gets every event, in order"""
    env.listen()
    p, qmp = env.start(stopped=False)
    ch, h = handshake(env)
    ch.request(RELEASE)         # events from before the test are in
    ch.pending.clear()
    # 1200 events (48 KB): more than the socket holds, so QEMU queues
    # the rest (below its 64 KiB bound) while the broker does not read
    worst = 0
    for _ in range(600):
        worst = max(worst, pause_resume(qmp))
    print('    600 stop/cont with an unread channel: slowest QMP answer '
          '%.0f ms' % (worst * 1000))
    seqs = []
    for i in range(1200):
        ev = ch.expect(EVENT)
        check(ev['kind'] == ('PAUSED', 'RESUMED')[i % 2],
              'event %d is %s' % (i, ev['kind']))
        seqs.append(ev['seq'])
    check(seqs == list(range(seqs[0], seqs[0] + 1200)),
          'event seq not consecutive')
    r = ch.request(RELEASE)
    check(r['error'] == 0, 'the channel still serves requests')
    check('reconnecting' not in env.stderr(p), 'QEMU did not reconnect')
    ch.close()
    env.stop(p)


def t_stuck_broker(env):
    """a broker that stops reading: past 64 KiB QEMU reconnects"""
    env.listen()
    p, qmp = env.start(stopped=False)
    ch, h = handshake(env)
    # WELCOMEd, and never read again: every stop/cont adds two EVENTs,
    # until QEMU hangs up (the unread data stays readable)
    hup = select.poll()
    hup.register(ch.sock, select.POLLHUP)
    worst = cycles = 0
    deadline = time.monotonic() + 120
    while not hup.poll(0):
        worst = max(worst, pause_resume(qmp))
        cycles += 1
        check(time.monotonic() < deadline,
              'QEMU still connected after %d stop/cont' % cycles)
    print('    disconnected after %d stop/cont (%d events); slowest QMP '
          'answer %.0f ms' % (cycles, 2 * cycles, worst * 1000))
    check('does not read' in env.stderr(p), 'the reason is logged')
    conn = env.accept().sock
    # the old connection ends (its unsent output is dropped) ...
    data = b''
    ch.sock.settimeout(10)
    while True:
        try:
            chunk = ch.sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    check(len(data) < 2 * cycles * 40, 'the queued output was dropped')
    ch.close()
    # ... and the new one starts with HELLO, carrying the state
    ch = Channel(conn)
    h2 = ch.expect(HELLO)
    check(h2['start_time'] == h['start_time'] and h2['pid'] == p.pid,
          'the same QEMU')
    check(h2['flags'] & 8, 'HELLO says running')
    ch.send(WELCOME, struct.pack('<HHI', 1, 0, 0), seq=0)
    qmp.cmd('stop')
    ev = ch.event('PAUSED')
    check(ev['running'] == 0, 'events flow on the new connection')
    r = ch.request(RELEASE)
    check(r['error'] == 0, 'requests too')
    ch.close()
    env.stop(p)


def t_object_del(env):
    """object-del with output still queued leaves nothing behind"""
    env.listen()
    p, qmp = env.start(stopped=False)
    ch, h = handshake(env)
    for _ in range(400):        # 800 events: more than the socket holds
        pause_resume(qmp)
    qmp.cmd('object-del', id='vmi0')
    # the broker reads again: the socket has room, and nothing may be
    # woken for the object's queue
    data = b''
    ch.sock.settimeout(2)
    try:
        while True:
            chunk = ch.sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    check(len(data) < 800 * 40, 'the queued output was dropped')
    for _ in range(3):
        pause_resume(qmp)
    check(p.poll() is None, 'QEMU runs')
    ch.close()
    env.stop(p)


def t_welcome_timeout(env):
    """no WELCOME within 10 s: QEMU disconnects and reconnects"""
    env.listen()
    p, qmp = env.start()
    ch = env.accept()
    ch.expect(HELLO)
    t0 = time.monotonic()
    ch.assert_closed(timeout=15)
    dt = time.monotonic() - t0
    check(9 < dt < 12, 'closed after %.1f s' % dt)
    ch = env.accept()
    ch.expect(HELLO)
    ch.close()
    env.stop(p)


def t_required_cont(env):
    """required=on with -S: 'cont' is deferred until RELEASE"""
    env.listen()
    p, qmp = env.start(',required=on,required-timeout=2')
    ch, h = handshake(env)
    check(h['flags'] & 6 == 6, 'REQUIRED|HELD flags %#x' % h['flags'])
    qmp.cmd('cont')       # succeeds, but the start is deferred
    time.sleep(0.3)
    check(qmp.status() != 'running', 'vCPUs held after cont')
    ev = ch.event('REQUIRED_TIMEOUT', timeout=5)
    check(ev['running'] == 0, 'still paused')
    check('introspection is required' in env.stderr(p), 'logged why')
    # HOOK is allowed while held (the real kernel then refuses it)
    a, b = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check(r['step'] == 'HOOK', 'HOOK while held reaches the ioctl: %s' % r)
    r = ch.request(RELEASE)
    check(r['error'] == 0, 'RELEASE')
    ch.event('RESUMED')
    check(qmp.status() == 'running', 'running after RELEASE')
    ch.close()
    env.stop(p)


def t_required_no_s(env):
    """required=on without -S: the VM starts only after RELEASE"""
    env.listen()
    p, qmp = env.start(',required=on', stopped=False)
    ch, h = handshake(env)
    check(h['flags'] & 8 == 0, 'not running')
    time.sleep(0.5)
    check(qmp.status() != 'running', 'held: %s' % qmp.status())
    ch.request(RELEASE)
    ch.event('RESUMED')
    check(qmp.status() == 'running', 'running after RELEASE')
    ch.close()
    env.stop(p)


def t_migration(env):
    """outgoing (cancelled, completed) and incoming migration events"""
    env.listen()
    p, qmp = env.start(stopped=False, qmp_name='src')
    ch, h = handshake(env)
    # cancelled: throttled so that it is still running
    qmp.cmd('migrate-set-parameters', **{'max-bandwidth': 4096})
    qmp.cmd('migrate', uri='exec:cat > /dev/null')
    ev = ch.event('MIGRATION_OUT')
    a, b = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check((r['step'], r['error']) == ('STATE', errno.EBUSY),
          'HOOK while migrating: %s' % r)
    qmp.cmd('migrate_cancel')
    ev = ch.event('MIGRATION_FAILED')
    check(ev['running'] == 1, 'runs here after cancel')
    # a real migration to a second QEMU on the same broker
    mig = os.path.join(env.dir, 'mig.sock')
    time.sleep(1.1)     # so that the destination's own start_time differs
    p2, qmp2 = env.start(extra=['-incoming', 'unix:' + mig],
                         stopped=False, qmp_name='dst', uid=p.uid)
    ch2, h2 = handshake(env)
    check(h2['flags'] & 8 == 0, 'destination not running')
    check(h2['start_time'] != h['start_time'], 'own start_time first')
    r = ch2.request(HOOK, lists(), fds=[a.fileno()])
    check((r['step'], r['error']) == ('STATE', errno.EBUSY),
          'HOOK on the destination before the migration ended: %s' % r)
    qmp.cmd('migrate-set-parameters', **{'max-bandwidth': 1 << 30})
    qmp.cmd('migrate', uri='unix:' + mig)
    ch.event('MIGRATION_OUT')
    ev = ch2.event('MIGRATION_IN', timeout=30)
    check(ev['start_time'] == h['start_time'],
          'start_time carried: %d vs %d' % (ev['start_time'],
                                            h['start_time']))
    check(ev['running'] == 1, 'destination runs')
    r = ch2.request(HOOK, lists(), fds=[a.fileno()])
    check(r['step'] == 'HOOK', 'HOOK reaches the ioctl after MIGRATION_IN')
    ch.close()
    ch2.close()
    env.stop(p)
    env.stop(p2)


def make_disk(env, qmp):
    """a qcow2 node 'disk0' for internal snapshots (no qemu-img needed)"""
    img = os.path.join(env.dir, 'disk.qcow2')
    open(img, 'wb').close()
    qmp.cmd('blockdev-add', driver='file', filename=img,
            **{'node-name': 'file0'})
    qmp.cmd('blockdev-create', **{'job-id': 'create0', 'options': {
        'driver': 'qcow2', 'file': 'file0', 'size': 1 << 20}})
    wait_job(qmp, 'create0')
    qmp.cmd('blockdev-add', driver='qcow2', file='file0',
            **{'node-name': 'disk0'})


def wait_job(qmp, job_id, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for j in qmp.cmd('query-jobs'):
            if j['id'] == job_id and j['status'] == 'concluded':
                qmp.cmd('job-dismiss', id=job_id)
                check('error' not in j, 'job %s: %s' % (job_id,
                                                       j.get('error')))
                return
        time.sleep(0.1)
    raise Fail('job %s did not conclude' % job_id)


def snapshot_save(qmp, tag):
    qmp.cmd('snapshot-save', **{'job-id': 'save-' + tag, 'tag': tag,
                                'vmstate': 'disk0', 'devices': ['disk0']})


def t_savevm(env):
    """snapshot-save gives SAVEVM then RESUMED"""
    env.listen()
    p, qmp = env.start(stopped=False)
    ch, h = handshake(env)
    make_disk(env, qmp)
    snapshot_save(qmp, 'snap1')
    wait_job(qmp, 'save-snap1')
    ev = ch.event('SAVEVM')
    check(ev['running'] == 0, 'SAVEVM while stopped')
    ch.event('RESUMED')
    ch.close()
    env.stop(p)


def t_shutdown(env):
    """QMP quit sends SHUTDOWN"""
    env.listen()
    p, qmp = env.start(stopped=False)
    ch, h = handshake(env)
    # A round trip first: QEMU must have read everything we sent, else its exit
    # resets the connection and the SHUTDOWN event queued for us is dropped.
    ch.request(RELEASE)
    try:
        qmp.cmd('quit')
    except (EOFError, OSError):
        pass
    ch.event('SHUTDOWN')
    p.wait(10)
    ch.close()


# -- with a kernel double: the hooked path

def hooked(env, opts='', stopped=False, env_extra=None, enable=True):
    env.listen()
    p, qmp = env.start(opts, stopped=stopped, double=True,
                       env_extra=env_extra)
    ch, h = handshake(env)
    a, b = tool_pair()
    r = ch.request(HOOK, lists(12, [-1], [0, 1, 5]), fds=[a.fileno()])
    check((r['step'], r['error'], r['hooked']) == ('NONE', 0, 1),
          'HOOK with the double: %s' % r)
    a.close()           # QEMU keeps its own copy
    if enable:
        enable_unhook_event(b)
    return p, qmp, ch, b


def enable_unhook_event(tool):
    """As a KVMI tool does: KVMI_VM_CONTROL_EVENTS(UNHOOK, enable), v12.

    A kernel double that serves the socket answers; one that does not
    (it then sends the unhook event unconditionally) stays silent."""
    tool.sendall(struct.pack('<HHI', 10, 8, 1) +
                 struct.pack('<HBBI', 0, 1, 0, 0))
    tool.settimeout(1)
    try:
        reply = tool.recv(16)
        check(len(reply) == 16 and struct.unpack('<i', reply[8:12])[0] == 0,
              'VM_CONTROL_EVENTS reply %r' % reply)
    except socket.timeout:
        pass
    tool.settimeout(None)


def t_d_hello_hooked(env):
    """after a broker restart, HELLO says hooked with the abi"""
    p, qmp, ch, tool = hooked(env)
    a, _ = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check((r['step'], r['error']) == ('STATE', errno.EEXIST), 'EEXIST')
    r = ch.request(SET_ALLOWED, lists(12, [2, 4], []))
    check(r['error'] == 0 and r['hooked'] == 1, 'SET_ALLOWED: %s' % r)
    r = ch.request(SET_ALLOWED, lists(7, [2], []))
    check(r['step'] == 'REQUEST', 'SET_ALLOWED abi mismatch')
    r = ch.request(SET_ALLOWED, lists(12, [99], []))
    check((r['step'], r['error'], r['failed_id'], r['hooked']) ==
          ('COMMAND', errno.EINVAL, 99, 0),
          'SET_ALLOWED failure unhooks: %s' % r)
    b = tool
    a, tool = tool_pair()
    r = ch.request(HOOK, lists(12, [-1], [-1]), fds=[a.fileno()])
    check(r['hooked'] == 1, 'rehook')
    ch.close()
    ch, h = handshake(env)
    check(h['flags'] & 1 and h['hooked_abi'] == 12, 'HELLO hooked v12')
    r = ch.request(HOOK, lists(7, [5], [77]), fds=[a.fileno()])
    check(r['step'] == 'STATE', 'still hooked')
    ch.request(UNHOOK)
    r = ch.request(HOOK, lists(12, [5], [77]), fds=[a.fileno()])
    check((r['step'], r['error'], r['failed_id'], r['hooked']) ==
          ('EVENT', errno.EINVAL, 77, 0), 'failed event id: %s' % r)
    ch.close()
    env.stop(p)


def t_d_applied(env):
    """version 2: HELLO echoes the id and digest of HOOK/SET_ALLOWED"""
    env.listen()
    p, qmp = env.start(stopped=False, double=True)
    ch, h = handshake(env, version=2)
    check(h['applied'] == NO_APPLIED, 'not hooked: zeros')
    a, tool = tool_pair()
    r = ch.request(HOOK, lists(12, [-1], [0]) + applied(0xA1, 0xD1),
                   fds=[a.fileno()])
    check(r['hooked'] == 1, 'HOOK with the tail: %s' % r)
    a.close()
    # A restarted broker is told what QEMU was hooked with
    ch.close()
    ch, h = handshake(env, version=2)
    check(h['flags'] & 1, 'hooked')
    check(h['applied'] == applied(0xA1, 0xD1), 'HOOK id and digest echoed')
    r = ch.request(SET_ALLOWED, lists(12, [2, 4], []) + applied(0xA1, 0xD2))
    check(r['error'] == 0 and r['hooked'] == 1, 'SET_ALLOWED: %s' % r)
    ch.close()
    ch, h = handshake(env, version=2)
    check(h['applied'] == applied(0xA1, 0xD2), 'SET_ALLOWED digest echoed')
    # Without the tail (a version 1 request) the record is unknown: zeros
    r = ch.request(SET_ALLOWED, lists(12, [2], []))
    check(r['error'] == 0, 'SET_ALLOWED without the tail: %s' % r)
    ch.close()
    ch, h = handshake(env, version=2)
    check(h['flags'] & 1 and h['applied'] == NO_APPLIED,
          'version 1 SET_ALLOWED leaves no record')
    # A refused SET_ALLOWED keeps the old record (still hooked)
    r = ch.request(SET_ALLOWED, lists(12, [2], []) + applied(0xA1, 0xD3))
    r = ch.request(SET_ALLOWED, lists(7, [2], []) + applied(0xB1, 0xD4))
    check(r['step'] == 'REQUEST' and r['hooked'] == 1, 'abi mismatch')
    ch.close()
    ch, h = handshake(env, version=2)
    check(h['applied'] == applied(0xA1, 0xD3), 'refused request: old record')
    # Every unhook clears it: the tool hanging up ...
    tool.close()
    ev = ch.event('TOOL_HANGUP')
    check(ev['hooked'] == 0, 'unhooked')
    ch.close()
    ch, h = handshake(env, version=2)
    check(not h['flags'] & 1 and h['applied'] == NO_APPLIED,
          'hang-up clears the record')
    # ... UNHOOK ...
    a, tool = tool_pair()
    ch.request(HOOK, lists() + applied(0xA2, 0xD5), fds=[a.fileno()])
    ch.request(UNHOOK)
    ch.close()
    ch, h = handshake(env, version=2)
    check(h['applied'] == NO_APPLIED, 'UNHOOK clears the record')
    # ... and a failed SET_ALLOWED (QEMU unhooks)
    ch.request(HOOK, lists() + applied(0xA3, 0xD6), fds=[a.fileno()])
    r = ch.request(SET_ALLOWED, lists(12, [99], []) + applied(0xA3, 0xD7))
    check(r['hooked'] == 0, 'failed SET_ALLOWED unhooks: %s' % r)
    ch.close()
    ch, h = handshake(env, version=2)
    check(not h['flags'] & 1 and h['applied'] == NO_APPLIED,
          'failed SET_ALLOWED clears the record')
    ch.close()
    env.stop(p)


def t_d_version1(env):
    """a version 1 broker: WELCOME 1 and HOOK without a tail still work"""
    env.listen()
    p, qmp = env.start(stopped=False, double=True)
    ch, h = handshake(env, version=1)
    a, tool = tool_pair()
    r = ch.request(HOOK, lists(12, [-1], [0]), fds=[a.fileno()])
    check(r['hooked'] == 1, 'HOOK without the tail: %s' % r)
    ch.close()
    ch, h = handshake(env, version=1)
    check(h['flags'] & 1 and h['hooked_abi'] == 12, 'HELLO hooked v12')
    check(h['applied'] == NO_APPLIED, 'no record without the tail')
    r = ch.request(SET_ALLOWED, lists(12, [2], []))
    check(r['error'] == 0 and r['hooked'] == 1, 'SET_ALLOWED: %s' % r)
    ch.close()
    # A WELCOME for a version QEMU does not speak closes the channel
    for bad in (0, 3):
        ch = env.accept()
        ch.expect(HELLO)
        ch.send(WELCOME, struct.pack('<HHI', bad, 0, 0), seq=0)
        ch.assert_closed()
    check('unsupported channel version' in env.stderr(p), 'logged')
    ch, h = handshake(env, version=2)
    check(h['flags'] & 1, 'still hooked after the refused versions')
    ch.close()
    env.stop(p)


def t_d_hangup(env):
    """the tool closing its socket gives TOOL_HANGUP and an UNHOOK"""
    p, qmp, ch, tool = hooked(env)
    tool.close()
    ev = ch.event('TOOL_HANGUP')
    check(ev['hooked'] == 0, 'unhooked after hang-up')
    check('UNHOOK' in env.stderr(p), 'UNHOOK issued (double log)')
    ch.close()
    env.stop(p)


def t_d_stop_waits(env):
    """QMP stop waits for the tool, without blocking the main loop"""
    p, qmp, ch, tool = hooked(env)
    import threading
    done = {}

    def do_stop():
        t0 = time.monotonic()
        qmp.cmd('stop')
        done['t'] = time.monotonic() - t0
    th = threading.Thread(target=do_stop)
    th.start()
    # the kernel double wrote KVMI_VM_EVENT_UNHOOK to the tool's socket
    tool.settimeout(5)
    ev = tool.recv(16)
    check(len(ev) == 16, 'tool got the unhook event')
    time.sleep(1.5)
    check('t' not in done, 'stop returned before the tool closed')
    # the broker channel (main loop) still answers while stop waits
    r = ch.request(RELEASE, timeout=2)
    check(r['error'] == 0, 'main loop alive during the wait')
    tool.close()
    th.join(10)
    check('t' in done and done['t'] >= 1.5, 'stop waited for the tool')
    ev = ch.event('PAUSED')
    check(ev['hooked'] == 0 and ev['running'] == 0, 'PAUSED unhooked')
    check(qmp.status() == 'paused', 'paused')
    print('    stop returned after %.2f s (tool closed after ~1.5 s)' %
          done['t'])
    a, b = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check((r['step'], r['error']) == ('STATE', errno.EBUSY), 'paused')
    qmp.cmd('cont')
    ch.event('RESUMED')
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check(r['hooked'] == 1, 'rehook after cont')
    ch.close()
    env.stop(p)


def t_d_unhook_timeout(env):
    """a tool that does not close is unhooked after unhook-timeout"""
    p, qmp, ch, tool = hooked(env, ',unhook-timeout=2')
    t0 = time.monotonic()
    qmp.cmd('stop')
    dt = time.monotonic() - t0
    check(1.8 < dt < 4, 'stop took %.1f s' % dt)
    ev = ch.event('PAUSED')
    check(ev['error'] == errno.ETIMEDOUT and ev['hooked'] == 0,
          'PAUSED after timeout: %s' % ev)
    ch.close()
    env.stop(p)


def t_d_tool_never_closes(env):
    """defaults: stop and SIGTERM wait at most 5 s for a stuck tool"""
    # libvirt fails other calls for a domain whose job (the 'stop') is
    # not done within 30 s, and sends SIGKILL 10 s after SIGTERM
    p, qmp, ch, tool = hooked(env)
    t0 = time.monotonic()
    qmp.cmd('stop', timeout=30)
    dt = time.monotonic() - t0
    tool.settimeout(1)
    check(len(tool.recv(16)) == 16, 'the tool got the unhook event')
    check(4.5 < dt < 7, 'stop took %.1f s' % dt)
    ev = ch.event('PAUSED')
    check(ev['error'] == errno.ETIMEDOUT and ev['hooked'] == 0, str(ev))
    check('within 5 s; unhooking anyway' in env.stderr(p), 'logged')
    print('    stop returned after %.2f s (the tool never closed)' % dt)
    qmp.cmd('cont')
    ch.event('RESUMED')
    a, tool2 = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check(r['hooked'] == 1, 'hooked again')
    a.close()
    enable_unhook_event(tool2)
    t0 = time.monotonic()
    p.terminate()
    ev = ch.event('SHUTDOWN', timeout=15)
    dt = time.monotonic() - t0
    check(4.5 < dt < 7, 'SIGTERM waited %.1f s' % dt)
    check(ev['error'] == errno.ETIMEDOUT and ev['hooked'] == 0, str(ev))
    p.wait(10 - dt)
    dt = time.monotonic() - t0
    check(dt < 10, 'QEMU exited %.1f s after SIGTERM' % dt)
    print('    QEMU exited %.2f s after SIGTERM (the tool never closed)' %
          dt)
    ch.close()
    tool.close()
    tool2.close()


def t_d_shutdown_bound(env):
    """shutdown-timeout shortens an unhook already under way"""
    p, qmp, ch, tool = hooked(env, ',unhook-timeout=30,shutdown-timeout=2')
    check('give up after 30 s' in env.stderr(p), 'unhook-timeout warning')
    qmp.cmd('human-monitor-command', **{'command-line': 'stop'})
    tool.settimeout(5)
    check(len(tool.recv(16)) == 16, 'the tool got the unhook event')
    time.sleep(0.5)
    check(qmp.status() == 'running', 'the deferred stop waits')
    t0 = time.monotonic()
    p.terminate()
    ch.event('SHUTDOWN', timeout=15)
    dt = time.monotonic() - t0
    check(1.5 < dt < 4, 'SIGTERM waited %.1f s' % dt)
    p.wait(10)
    ch.close()


def t_d_hmp_stop(env):
    """HMP stop (no coroutine) is deferred until the tool unhooks"""
    p, qmp, ch, tool = hooked(env)
    qmp.cmd('human-monitor-command', **{'command-line': 'stop'})
    check(qmp.status() == 'running', 'deferred')
    tool.close()
    ev = ch.event('PAUSED')
    check(ev['hooked'] == 0, 'unhooked')
    time.sleep(0.2)
    check(qmp.status() == 'paused', 'paused after unhook')
    ch.close()
    env.stop(p)


def t_d_preunhook_enoent(env):
    """a tool without the unhook event: the stop unhooks at once"""
    # (DOUBLE_PREUNHOOK_ENOENT is for a double that does not serve the
    # socket and would otherwise always send the unhook event)
    p, qmp, ch, tool = hooked(env, enable=False,
                              env_extra={'DOUBLE_PREUNHOOK_ENOENT': '1'})
    t0 = time.monotonic()
    qmp.cmd('stop')
    check(time.monotonic() - t0 < 1, 'no wait')
    ev = ch.event('PAUSED')
    check(ev['error'] == errno.ENOENT and ev['hooked'] == 0, 'ENOENT')
    ch.close()
    env.stop(p)


def t_d_migration(env):
    """outgoing migration waits for the tool (WAIT_UNPLUG), then goes on"""
    p, qmp, ch, tool = hooked(env)
    qmp.cmd('migrate', uri='exec:cat > /dev/null')
    time.sleep(1)
    st = qmp.cmd('query-migrate')['status']
    check(st == 'wait-unplug', 'migration waits: %s' % st)
    check(qmp.status() == 'running', 'guest runs meanwhile')
    tool.close()
    ev = ch.event('MIGRATION_OUT')
    check(ev['hooked'] == 0, 'unhooked')
    for _ in range(100):
        if qmp.cmd('query-migrate')['status'] == 'completed':
            break
        time.sleep(0.1)
    check(qmp.cmd('query-migrate')['status'] == 'completed', 'completed')
    ch.close()
    env.stop(p)


def t_d_migration_cancel(env):
    """a migration cancelled while waiting re-enables introspection"""
    p, qmp, ch, tool = hooked(env)
    qmp.cmd('migrate', uri='exec:cat > /dev/null')
    time.sleep(0.5)
    qmp.cmd('migrate_cancel')
    # QEMU's WAIT_UNPLUG state lets a started unplug finish, even when
    # the migration is cancelled: the tool unhooks, then the failure is
    # reported
    time.sleep(0.5)
    tool.close()
    ev = ch.event('MIGRATION_FAILED')
    check(ev['hooked'] == 0 and ev['running'] == 1, 'runs, unhooked')
    a, b = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check(r['hooked'] == 1, 'HOOK again after the failed migration')
    ch.close()
    env.stop(p)


def t_d_reset(env):
    """guest reset while hooked waits for the tool, then RESET"""
    p, qmp, ch, tool = hooked(env)
    time.sleep(1.1)
    qmp.cmd('system_reset')
    tool.settimeout(5)
    check(len(tool.recv(16)) == 16, 'tool got the unhook event')
    try:
        ch.event('RESET', timeout=1)
        raise Fail('RESET before the tool closed')
    except Fail as e:
        if 'before' in str(e):
            raise
    tool.close()
    ev = ch.event('RESET')
    check(ev['hooked'] == 0, 'unhooked by reset')
    check(ev['start_time'] > 0, 'start_time')
    ch.close()
    env.stop(p)


def t_d_shutdown(env):
    """quit while hooked waits for the tool (bounded), then SHUTDOWN"""
    p, qmp, ch, tool = hooked(env, ',unhook-timeout=2')
    t0 = time.monotonic()
    try:
        qmp.cmd('quit')
    except (EOFError, OSError):
        pass
    ev = ch.event('SHUTDOWN')
    dt = time.monotonic() - t0
    check(1.8 < dt < 4, 'waited %.1f s for the tool' % dt)
    check(ev['error'] == errno.ETIMEDOUT and ev['hooked'] == 0, str(ev))
    p.wait(10)
    ch.close()


def t_d_savevm(env):
    """snapshot-save waits for the tool in its job coroutine"""
    p, qmp, ch, tool = hooked(env)
    make_disk(env, qmp)
    snapshot_save(qmp, 'snap1')
    tool.settimeout(5)
    check(len(tool.recv(16)) == 16, 'tool got the unhook event')
    time.sleep(1)
    check(qmp.status() == 'running', 'guest runs while the tool unhooks')
    tool.close()
    wait_job(qmp, 'save-snap1')
    ev = ch.event('SAVEVM')
    check(ev['hooked'] == 0, 'unhooked before the snapshot')
    ch.event('RESUMED')
    ch.close()
    env.stop(p)


def t_d_hmp_savevm(env):
    """HMP savevm cannot wait: PREUNHOOK, UNHOOK at once"""
    p, qmp, ch, tool = hooked(env)
    make_disk(env, qmp)
    qmp.cmd('human-monitor-command', **{'command-line': 'savevm snap2'})
    ev = ch.event('SAVEVM')
    check(ev['hooked'] == 0, 'unhooked')
    tool.settimeout(5)
    check(len(tool.recv(16)) == 16, 'tool got the unhook event')
    ch.event('RESUMED')
    ch.close()
    env.stop(p)


def t_d_required(env):
    """required=on: a successful HOOK starts the vCPUs"""
    env.listen()
    p, qmp = env.start(',required=on', stopped=False, double=True)
    ch, h = handshake(env)
    check(qmp.status() != 'running', 'held')
    a, b = tool_pair()
    r = ch.request(HOOK, lists(), fds=[a.fileno()])
    check(r['hooked'] == 1, 'hooked while held')
    ch.event('RESUMED')
    check(qmp.status() == 'running', 'running after HOOK')
    ch.close()
    env.stop(p)


BASE = [t_hello, t_config_errors, t_hook_real_kernel, t_stop_cont_reset, t_reconnect,
        t_required_cont, t_required_no_s, t_migration, t_savevm, t_shutdown,
        t_welcome_timeout, t_slow_broker, t_stuck_broker, t_object_del,
        t_host_wide, t_host_wide_explicit, t_host_wide_no_broker,
        t_host_wide_errors]
DOUBLE = [t_d_hello_hooked, t_d_applied, t_d_version1, t_d_hangup, t_d_stop_waits, t_d_unhook_timeout,
          t_d_tool_never_closes, t_d_shutdown_bound,
          t_d_hmp_stop, t_d_preunhook_enoent, t_d_migration,
          t_d_migration_cancel, t_d_reset, t_d_shutdown, t_d_savevm,
          t_d_hmp_savevm, t_d_required]


def main():
    global VERBOSE
    ap = argparse.ArgumentParser()
    ap.add_argument('qemu')
    ap.add_argument('--kernel-double')
    ap.add_argument('-k', default='')
    ap.add_argument('-v', action='store_true')
    o = ap.parse_args()
    VERBOSE = o.v
    tests = BASE + (DOUBLE if o.kernel_double else [])
    failed = passed = 0
    for t in tests:
        if not re.search(o.k, t.__name__):
            continue
        env = Env(os.path.abspath(o.qemu),
                  os.path.abspath(o.kernel_double or ''))
        t0 = time.monotonic()
        try:
            t(env)
            passed += 1
            print('ok   %-22s %5.1fs  %s' % (t.__name__,
                                            time.monotonic() - t0,
                                            t.__doc__), flush=True)
        except Exception as e:
            failed += 1
            print('FAIL %-22s %s: %s' % (t.__name__, t.__doc__, e),
                  flush=True)
            if VERBOSE:
                traceback.print_exc()
            for p in env.procs:
                print('   stderr of QEMU %d:' % p.pid)
                print('   | ' + env.stderr(p).replace('\n', '\n   | '))
        finally:
            env.cleanup()
    print('%d passed, %d failed' % (passed, failed))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
