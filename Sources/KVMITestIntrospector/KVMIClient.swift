import Foundation
import KVMIBrokerCore

#if canImport(Glibc)
    import Glibc
#endif

/// What the test introspector does after the handshake in KVMI client mode, as a real tool
/// does first: GET_VERSION (already queued behind the reply), check commands and events,
/// enable the unhook event, then wait; on KVMI_VM_EVENT_UNHOOK it closes its socket (unless
/// `closesOnUnhook` is off).
public struct KVMIClientPlan: Sendable, Equatable {
    public var abi: ABIGeneration
    public var commands: [String]
    public var events: [String]
    /// False plays a tool that never lets go: it takes the unhook event and keeps its socket
    /// open until the other end is closed (QEMU's UNHOOK after its unhook-timeout), so that
    /// QEMU's bound on the wait can be tested through libvirt.
    public var closesOnUnhook: Bool

    public init(abi: ABIGeneration, commands: [String], events: [String], closesOnUnhook: Bool = true) throws {
        for name in commands where KVMINames.commands(abi)[name] == nil {
            throw BrokerError(.invalidArgument, "ABI \(abi) has no command \(name)")
        }
        for name in events where KVMINames.events(abi)[name] == nil {
            throw BrokerError(.invalidArgument, "ABI \(abi) has no event \(name)")
        }
        self.abi = abi
        self.commands = commands
        self.events = events
        self.closesOnUnhook = closesOnUnhook
    }
}

/// What one KVMI session saw, updated as it goes.
public struct KVMISessionRecord: Sendable, Equatable {
    /// From the GET_VERSION reply; nil until answered.
    public var version: UInt32?
    /// Error code per checked name (0 allowed, -1 -KVM_EPERM, ...), commands as "command:NAME".
    public var checks: [String: Int32] = [:]
    /// Result of enabling the unhook event.
    public var unhookEnabled: Int32?
    public var unhookEventReceived = false
    /// Why the session ended, once it has.
    public var ended: String?
    /// A tool that never lets go: the other end closed the socket after the unhook event (the
    /// kernel's UNHOOK), not this tool.
    public var closedByOtherEndAfterUnhook = false
}

struct KVMIClient {
    let fd: Int32
    let plan: KVMIClientPlan
    let stopFD: Int32
    let update: (@Sendable (inout KVMISessionRecord) -> Void) -> Void

    func run() {
        do {
            try converse()
        } catch {
            update { $0.ended = "\(error)" }
        }
    }

    private func converse() throws {
        // GET_VERSION went out with seq 1 right behind the handshake reply.
        let version = try reply(seq: 1)
        if version.err == 0, version.payload.count >= 4 {
            let value = version.payload.read(UInt32.self, at: 0, order: .host)
            update { $0.version = value }
        } else {
            update { $0.version = 0 }
        }
        var seq: UInt32 = 1
        let commandID = Int32(KVMINames.commands(plan.abi)["VM_CHECK_COMMAND"]!)
        let eventID = Int32(KVMINames.commands(plan.abi)["VM_CHECK_EVENT"]!)
        for name in plan.commands {
            seq += 1
            try send(KVMIWire.message(id: commandID, seq: seq, body: KVMIWire.checkBody(KVMINames.commands(plan.abi)[name]!)))
            let answer = try reply(seq: seq)
            update { $0.checks["command:\(name)"] = answer.err }
        }
        for name in plan.events {
            seq += 1
            try send(KVMIWire.message(id: eventID, seq: seq, body: KVMIWire.checkBody(KVMINames.events(plan.abi)[name]!)))
            let answer = try reply(seq: seq)
            update { $0.checks["event:\(name)"] = answer.err }
        }
        let control = Int32(KVMINames.commands(plan.abi)["VM_CONTROL_EVENTS"]!)
        // The kernel serves the socket from HOOK on, and QEMU allows commands and events with
        // ioctls right after it: a tool that is quicker than QEMU's main thread gets -KVM_EPERM
        // (-1) in that window. Retry the enable (every 10 ms, bounded by the tests' 60 s), as a
        // tool that needs the unhook event must (the checks above are recorded as answered).
        var enabled: (err: Int32, payload: [UInt8])
        var tries = 0
        repeat {
            if tries > 0 { usleep(10_000) }
            tries += 1
            seq += 1
            try send(KVMIWire.message(id: control, seq: seq, body: KVMIWire.controlEventsBody(event: 0, enable: true)))
            enabled = try reply(seq: seq)
        } while enabled.err == -1 && tries < 6000
        update { [enabled] in $0.unhookEnabled = enabled.err }
        let closes = plan.closesOnUnhook
        // Now wait for the kernel to ask for the unhook; close as soon as it does (if the plan says so).
        while true {
            let (header, body) = try readMessage(timeout: -1)
            if header.id == KVMIWire.eventCarrier(plan.abi), KVMIWire.eventNumber(plan.abi, body: body) == 0 {
                update {
                    $0.unhookEventReceived = true
                    if closes { $0.ended = "closed after KVMI_VM_EVENT_UNHOOK" }
                }
                if closes { return }
                break
            }
        }
        // A tool that never lets go: hold the socket, reading, until the other end closes it.
        do {
            while true { _ = try readMessage(timeout: -1) }
        } catch let error as BrokerError where error.code == .peerClosed {
            update {
                $0.closedByOtherEndAfterUnhook = true
                $0.ended = "kept open after KVMI_VM_EVENT_UNHOOK until the other end closed it"
            }
        }
    }

    private func send(_ bytes: [UInt8]) throws {
        let sent = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        guard sent == bytes.count else { throw BrokerError(.peerClosed, "cannot send a KVMI message", errno: errno) }
    }

    private func reply(seq: UInt32) throws -> (err: Int32, payload: [UInt8]) {
        let (header, body) = try readMessage(timeout: 15_000)
        guard header.seq == seq, body.count >= 8 else {
            throw BrokerError(.protocolViolation, "expected the reply to seq \(seq), got id \(header.id) seq \(header.seq)")
        }
        return (body.read(Int32.self, at: 0, order: .host), Array(body[8...]))
    }

    /// One whole message; the timeout is per read in milliseconds (-1 waits until stopped).
    private func readMessage(timeout: Int32) throws -> (KVMIWire.Header, [UInt8]) {
        let header = KVMIWire.Header(try readExactly(KVMIWire.headerSize, timeout: timeout))
        guard Int(header.size) <= KVMIWire.maximumMessageSize else {
            throw BrokerError(.protocolViolation, "KVMI message of \(header.size) bytes")
        }
        return (header, try readExactly(Int(header.size), timeout: timeout))
    }

    private func readExactly(_ count: Int, timeout: Int32) throws -> [UInt8] {
        var bytes: [UInt8] = []
        while bytes.count < count {
            var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
            let ready = poll(&fds, 2, timeout)
            if ready == 0 { throw BrokerError(.timedOut, "no KVMI reply within \(timeout / 1000) s (is the guest hooked?)") }
            if fds[1].revents != 0 { throw BrokerError(.cancelled, "test introspector stopped") }
            var buffer = [UInt8](repeating: 0, count: count - bytes.count)
            let got = recv(fd, &buffer, buffer.count, 0)
            if got <= 0 { throw BrokerError(.peerClosed, "the socket was closed (by KVM, QEMU or the broker)") }
            bytes += buffer.prefix(got)
        }
        return bytes
    }
}
