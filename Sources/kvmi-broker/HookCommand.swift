import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerLibvirt
import KVMIBrokerOS
import KVMIBrokerPolicy

#if canImport(Glibc)
    import Glibc
#endif

/// `kvmi-broker hook`: libvirt's qemu hook (installed as /etc/libvirt/hooks/qemu.d/50-kvmi-broker).
/// A tiny, bounded client of the broker's control socket; it never calls libvirt.
struct HookCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hook",
        abstract: "libvirt's qemu hook: tell the broker about a domain; veto the start of a required guest that cannot be introspected.",
        discussion: """
            libvirt runs it as `50-kvmi-broker GUEST OPERATION SUB-OPERATION EXTRA` with the domain XML on stdin. \
            Only prepare and start can fail (exit 1, with the reason on stderr, which virsh shows). reconnect always \
            exits 0 (a failing reconnect hook kills the running QEMU); migrate and restore print nothing.
            """)

    @Argument(help: "libvirt's arguments: object, operation, sub-operation, extra.")
    var arguments: [String] = []

    @Option(help: "The broker's control socket.")
    var controlSocket = "/run/kvmi-broker/control.sock"

    @Option(help: "Seconds allowed to reach the broker and get its answer.")
    var timeout: Double = 5

    @Option(name: .customLong("policy-root"), help: "Policy roots, read when the broker is down (repeatable).")
    var policyRoots: [String] = []

    @Flag(help: "Accept policy files not owned by root when reading them here.")
    var allowNonRootOwner = false

    func run() throws {
        let operation = arguments.count > 1 ? arguments[1] : ""
        // reconnect: libvirtd restarted; a failure would kill the running QEMU. migrate/restore
        // read our stdout as XML: print nothing.
        guard ["prepare", "start", "started", "stopped", "release"].contains(operation) else { return }
        let mayVeto = operation == "prepare" || operation == "start"
        let input = FileHandle.standardInput.readDataToEndOfFile().prefix(16 << 20)
        guard let domain = try? DomainDescription(xml: String(decoding: input, as: UTF8.self)) else {
            if mayVeto { warn("kvmi-broker hook: cannot read the domain XML on stdin; not vetoing") }
            return
        }
        let request = ControlProtocol.Request(
            operation: operation, uuid: "\(domain.uuid)", name: domain.name, metadataWanted: domain.metadata?.wanted,
            metadataIntrospector: domain.metadata?.introspector, metadataRequired: domain.metadata?.required)
        switch ask(request) {
        case .success(let response):
            if mayVeto && !response.allow {
                warn(response.reason)
                throw ExitCode(1)
            }
        case .failure(let error):
            guard mayVeto else { return }
            // The broker is down: the guest may start only if nothing requires introspecting it.
            let sources = PolicySources(
                roots: policyRoots.isEmpty ? PolicySources.defaultRoots : policyRoots, requireRootOwnership: !allowNonRootOwner)
            let metadata = domain.metadata.map { GuestMetadata(wanted: $0.wanted, introspector: $0.introspector, required: $0.required) }
            var required = domain.metadata?.required ?? false
            var rule = domain.metadata?.required == true ? "its metadata (required=\"yes\")" : ""
            if let (policy, _) = try? Policy.load(sources) {
                let decision = policy.decide(GuestFacts(uuid: domain.uuid, name: domain.name, metadata: metadata))
                if decision.introspected && decision.required {
                    required = true
                    rule = decision.rule.map(\.description) ?? rule
                }
            }
            if required {
                warn("kvmi-broker: guest \(domain.name) (\(domain.uuid)) requires introspection per \(rule), but the broker is unreachable: \(error)")
                throw ExitCode(1)
            }
        }
    }

    private func warn(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    /// One request, one answer, every step bounded by the timeout.
    private func ask(_ request: ControlProtocol.Request) -> Result<ControlProtocol.Response, BrokerError> {
        let deadline = Date().addingTimeInterval(timeout)
        let socket: Descriptor
        do {
            socket = try connectUnixSocket(controlSocket, nonBlocking: true)
        } catch {
            return .failure(error)
        }
        defer { socket.close() }
        let fd = socket.raw
        func waitFor(_ events: Int16) -> Bool {
            var pollFD = pollfd(fd: fd, events: events, revents: 0)
            let remaining = Int32(max(0, deadline.timeIntervalSinceNow) * 1000)
            return poll(&pollFD, 1, remaining) > 0
        }
        guard let body = try? JSONEncoder().encode(request) else { return .failure(BrokerError(.io, "cannot encode the request")) }
        var bytes = Array(body) + [10]
        while !bytes.isEmpty {
            guard waitFor(Int16(POLLOUT)) else { return .failure(BrokerError(.timedOut, "no answer within \(timeout) s", at: controlSocket)) }
            let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent < 0 {
                if errno == EAGAIN { continue }
                return .failure(BrokerError(.connectFailed, String(cString: strerror(errno)), at: controlSocket, errno: errno))
            }
            bytes.removeFirst(sent)
        }
        var reply: [UInt8] = []
        while !reply.contains(10) && reply.count < ControlProtocol.maximumLine {
            guard waitFor(Int16(POLLIN)) else { return .failure(BrokerError(.timedOut, "no answer within \(timeout) s", at: controlSocket)) }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = recv(fd, &chunk, chunk.count, 0)
            if count < 0 && errno == EAGAIN { continue }
            guard count > 0 else { return .failure(BrokerError(.peerClosed, "the broker closed without answering", at: controlSocket)) }
            reply += chunk.prefix(count)
        }
        guard let response = try? JSONDecoder().decode(ControlProtocol.Response.self, from: Data(reply.prefix { $0 != 10 })) else {
            return .failure(BrokerError(.protocolViolation, "unreadable answer from the broker", at: controlSocket))
        }
        return .success(response)
    }
}

/// `kvmi-broker install-hook`: installs the libvirt hook (libvirt reads hooks when it starts).
struct InstallHookCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "install-hook", abstract: "Install the libvirt hook as /etc/libvirt/hooks/qemu.d/50-kvmi-broker (restart libvirtd afterwards).")

    @Option(help: "libvirt's qemu hook directory.")
    var hooksDirectory = "/etc/libvirt/hooks/qemu.d"

    @Option(help: "Extra arguments for `kvmi-broker hook` (e.g. --control-socket PATH).")
    var hookArguments: String = ""

    func run() throws {
        let executable = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().path
        try FileManager.default.createDirectory(atPath: hooksDirectory, withIntermediateDirectories: true)
        let path = hooksDirectory + "/50-kvmi-broker"
        let script = """
            #!/bin/sh
            # kvmi-broker's libvirt hook, installed by `kvmi-broker install-hook`. It only talks to the broker.
            exec \(executable) hook \(hookArguments) -- "$@"

            """
        guard FileManager.default.createFile(atPath: path, contents: Data(script.utf8), attributes: [.posixPermissions: 0o755]) else {
            throw ValidationError("cannot write \(path)")
        }
        print("installed \(path); restart libvirtd for it to take effect")
    }
}
