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
            exits 0 (a failing reconnect hook kills the running QEMU); migrate and restore print nothing. The domain \
            XML is read up to 4 MiB and within --timeout; a larger, unreadable or unfinished one vetoes prepare/start \
            only if what was read shows the domain is enrolled (our metadata element or our QEMU object). With the \
            broker down, the hook reads the policy itself: it vetoes a guest the policy or its metadata requires and, \
            when the policy does not load, every enrolled guest (naming the policy's first error).
            """)

    /// The most of the domain XML on stdin the hook reads (libvirt's are a few KiB).
    static let maximumInput = 4 << 20

    @Argument(help: "libvirt's arguments: object, operation, sub-operation, extra.")
    var arguments: [String] = []

    @Option(help: "The broker's control socket.")
    var controlSocket = "/run/kvmi-broker/control.sock"

    @Option(help: "Seconds the whole hook may take: reading the domain XML on stdin, reaching the broker and getting its answer.")
    var timeout: Double = 5

    @Option(name: .customLong("policy-root"), help: "Policy roots, read when the broker is down (repeatable).")
    var policyRoots: [String] = []

    @Flag(help: "Accept policy and secret files not owned by root when reading them here.")
    var allowNonRootOwner = false

    func validate() throws {
        guard timeout > 0, timeout <= 3600 else { throw ValidationError("--timeout must be more than 0 and at most 3600 seconds") }
    }

    func run() throws {
        let deadline = ContinuousClock.now.advanced(by: .milliseconds(Int64(timeout * 1000)))
        let operation = arguments.count > 1 ? arguments[1] : ""
        // reconnect: libvirtd restarted; a failure would kill the running QEMU. migrate/restore
        // read our stdout as XML: print nothing.
        guard ["prepare", "start", "started", "stopped", "release"].contains(operation) else { return }
        let mayVeto = operation == "prepare" || operation == "start"
        let input = Self.readStandardInput(limit: Self.maximumInput, until: deadline)
        let bytes: [UInt8]
        switch input {
        case .complete(let all):
            bytes = all
        case .tooLarge(let prefix):
            return try unreadable("the domain XML on stdin is larger than \(Self.maximumInput >> 20) MiB", prefix, mayVeto: mayVeto)
        case .timedOut(let prefix):
            return try unreadable(
                "the domain XML on stdin did not end within the --timeout of \(Duration.humanReadable(seconds: timeout)) (\(prefix.count) bytes read)",
                prefix, mayVeto: mayVeto)
        case .failed(let error, let prefix):
            return try unreadable("cannot read the domain XML on stdin (\(errnoName(error)))", prefix, mayVeto: mayVeto)
        }
        let domain: DomainDescription
        do {
            domain = try DomainDescription(xml: String(decoding: bytes, as: UTF8.self))
        } catch {
            return try unreadable("cannot read the domain XML on stdin: \(escapedForLog(error.description))", bytes, mayVeto: mayVeto)
        }
        let request = ControlProtocol.Request(
            operation: operation, uuid: "\(domain.uuid)", name: domain.name, metadataWanted: domain.metadata?.wanted,
            metadataIntrospector: domain.metadata?.introspector, metadataRequired: domain.metadata?.required, nova: domain.nova)
        switch ask(request, until: deadline) {
        case .success(let response):
            if mayVeto && !response.allow {
                warn(escapedForLog(response.reason, limit: 2048))
                throw ExitCode(1)
            }
        case .failure(let error):
            guard mayVeto else { return }
            if let reason = vetoWithoutBroker(domain, brokerError: error) {
                warn(reason)
                throw ExitCode(1)
            }
        }
    }

    /// The broker is down: the guest may start only if nothing requires introspecting it. The
    /// hook loads the policy (and its secrets) as the daemon does; a policy that does not load
    /// vetoes every enrolled guest (it might require it), and lets the others start.
    func vetoWithoutBroker(_ domain: DomainDescription, brokerError: BrokerError) -> String? {
        let guest = "guest \(escapedForLog(domain.name)) (\(domain.uuid))"
        let broker = "the broker is unreachable: \(escapedForLog(brokerError.description, limit: 512))"
        if domain.metadata?.required == true {
            return "kvmi-broker: \(guest) requires introspection per its metadata (required=\"yes\"), but \(broker)"
        }
        let sources = PolicySources(roots: policyRoots.isEmpty ? PolicySources.defaultRoots : policyRoots, requireRootOwnership: !allowNonRootOwner)
        let metadata = domain.metadata.map { GuestMetadata(wanted: $0.wanted, introspector: $0.introspector, required: $0.required) }
        do {
            let (policy, _, _) = try PolicyStore.loadWithSecrets(sources)
            // The domain XML comes from libvirt (the hook runs under libvirtd): its identity.
            let decision = policy.decide(
                GuestFacts(uuid: domain.uuid, name: domain.name, metadata: metadata, nova: domain.nova, identityVerified: true))
            let rule = decision.rule.map(\.description) ?? "the policy"
            switch decision.outcome {
            case .introspected where decision.required:
                return "kvmi-broker: \(guest) requires introspection per \(rule), but \(broker)"
            case .requiredButUnservable:
                return "kvmi-broker: \(guest) requires introspection per \(rule) (fail closed: \(decision.reason)), and \(broker)"
            default:
                return nil
            }
        } catch {
            let enrolment =
                domain.metadata != nil
                ? "its <introspection> metadata" : domain.enrolledChannelSocket != nil ? "its QEMU command line connects to the broker" : nil
            guard let enrolment else { return nil }
            let first = error.errors.first?.description ?? "the policy did not load"
            let more = error.errors.count > 1 ? " (and \(error.errors.count - 1) more errors)" : ""
            return
                "kvmi-broker: \(guest) is enrolled for introspection (\(enrolment)), \(broker), and the policy does not load, so it might require introspection: \(first)\(more); run 'kvmi-broker policy check'"
        }
    }

    /// The domain XML could not be read whole: veto prepare/start only if what was read shows
    /// the domain is enrolled (our metadata namespace, or our QEMU object); let others start.
    func unreadable(_ why: String, _ prefix: [UInt8], mayVeto: Bool) throws {
        guard mayVeto else { return }
        if let marker = Self.enrolmentMarker(in: prefix) {
            warn("kvmi-broker: \(why), and what was read shows the domain is enrolled for introspection (\(marker)): refusing to start it unchecked")
            throw ExitCode(1)
        }
        warn("kvmi-broker hook: \(why); what was read shows no kvmi-broker enrolment: not vetoing")
    }

    /// Which of our enrolment's traces `bytes` holds, if any.
    static func enrolmentMarker(in bytes: [UInt8]) -> String? {
        for (marker, what) in [(GuestMetadata.namespace, "our metadata namespace"), ("introspection-broker", "our QEMU object")]
        where contains(bytes, Array(marker.utf8)) {
            return what
        }
        return nil
    }

    static func contains(_ haystack: [UInt8], _ needle: [UInt8]) -> Bool {
        guard let first = needle.first, haystack.count >= needle.count else { return false }
        var index = 0
        while index <= haystack.count - needle.count {
            if haystack[index] == first && haystack[index..<index + needle.count].elementsEqual(needle) { return true }
            index += 1
        }
        return false
    }

    enum StandardInput {
        case complete([UInt8])
        /// More than the limit: the bytes read so far (the limit and at most one chunk more).
        case tooLarge([UInt8])
        case timedOut([UInt8])
        case failed(Int32, [UInt8])
    }

    /// Reads stdin to its end with a bounded buffer, waiting with poll() until `deadline`: a
    /// writer that never closes stdin, or one that sends gigabytes, cannot hold the hook.
    static func readStandardInput(limit: Int, until deadline: ContinuousClock.Instant) -> StandardInput {
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { return .timedOut(bytes) }
            var pollFD = pollfd(fd: STDIN_FILENO, events: Int16(POLLIN), revents: 0)
            let milliseconds = Int32(clamping: (remaining.components.seconds * 1000) + remaining.components.attoseconds / 1_000_000_000_000_000 + 1)
            let ready = poll(&pollFD, 1, milliseconds)
            if ready < 0 {
                if errno == EINTR { continue }
                return .failed(errno, bytes)
            }
            if ready == 0 { continue }
            let wanted = min(chunk.count, limit + 1 - bytes.count)
            let count = chunk.withUnsafeMutableBytes { read(STDIN_FILENO, $0.baseAddress, wanted) }
            if count < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                return .failed(errno, bytes)
            }
            if count == 0 { return .complete(bytes) }
            bytes += chunk[0..<count]
            if bytes.count > limit { return .tooLarge(bytes) }
        }
    }

    private func warn(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    /// One request, one answer, every step bounded by the hook's deadline.
    private func ask(_ request: ControlProtocol.Request, until deadline: ContinuousClock.Instant) -> Result<ControlProtocol.Response, BrokerError> {
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
            let remaining = ContinuousClock.now.duration(to: deadline)
            guard remaining > .zero else { return false }
            let milliseconds = Int32(clamping: (remaining.components.seconds * 1000) + remaining.components.attoseconds / 1_000_000_000_000_000 + 1)
            return poll(&pollFD, 1, milliseconds) > 0
        }
        let timedOut = BrokerError(
            .timedOut, "no answer within the hook's --timeout of \(Duration.humanReadable(seconds: timeout))", at: controlSocket)
        guard let body = try? JSONEncoder().encode(request) else { return .failure(BrokerError(.io, "cannot encode the request")) }
        var bytes = Array(body) + [10]
        while !bytes.isEmpty {
            guard waitFor(Int16(POLLOUT)) else { return .failure(timedOut) }
            let sent = bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if sent < 0 {
                if errno == EAGAIN || errno == EINTR { continue }
                return .failure(BrokerError(.connectFailed, String(cString: strerror(errno)), at: controlSocket, errno: errno))
            }
            bytes.removeFirst(sent)
        }
        var reply: [UInt8] = []
        while !reply.contains(10) && reply.count < ControlProtocol.maximumLine {
            guard waitFor(Int16(POLLIN)) else { return .failure(timedOut) }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let count = recv(fd, &chunk, chunk.count, 0)
            if count < 0 && (errno == EAGAIN || errno == EINTR) { continue }
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
        commandName: "install-hook",
        abstract: "Install the libvirt hook as /etc/libvirt/hooks/qemu.d/50-kvmi-broker (restart libvirtd afterwards).",
        discussion: """
            Writes a two-line shell script that runs `BROKER-PATH hook HOOK-ARGUMENTS -- "$@"`. BROKER-PATH is the \
            installed broker (--broker-path, default /usr/bin/kvmi-broker), not the binary that runs this command \
            (which may be a build directory); it must be an executable file. Prints the path it wrote and the \
            command the hook runs.
            """)

    @Option(help: "libvirt's qemu hook directory.")
    var hooksDirectory = "/etc/libvirt/hooks/qemu.d"

    @Option(help: "The installed kvmi-broker the hook runs (an absolute path to an executable file).")
    var brokerPath = "/usr/bin/kvmi-broker"

    @Option(help: "Extra arguments for `kvmi-broker hook` (e.g. --control-socket PATH).")
    var hookArguments: String = ""

    func validate() throws {
        guard brokerPath.hasPrefix("/") else {
            throw ValidationError(
                "--broker-path '\(escapedForLog(brokerPath))' is not an absolute path (libvirt runs hooks with another working directory)")
        }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: brokerPath, isDirectory: &isDirectory) else {
            throw ValidationError(
                "--broker-path '\(escapedForLog(brokerPath))' does not exist: install kvmi-broker there first or give the installed path with --broker-path"
            )
        }
        guard !isDirectory.boolValue, FileManager.default.isExecutableFile(atPath: brokerPath) else {
            throw ValidationError("--broker-path '\(escapedForLog(brokerPath))' is not an executable file")
        }
        // The script is run by /bin/sh: the path is written unquoted, so it must not need quoting.
        guard brokerPath.unicodeScalars.allSatisfy({ $0.isASCII && !" \t\n\"'\\$`;&|<>(){}[]*?!#~".unicodeScalars.contains($0) && $0.value >= 0x20 })
        else {
            throw ValidationError("--broker-path '\(escapedForLog(brokerPath))' holds characters a shell script would have to quote")
        }
    }

    func run() throws {
        try FileManager.default.createDirectory(atPath: hooksDirectory, withIntermediateDirectories: true)
        let path = hooksDirectory + "/50-kvmi-broker"
        let command = "\(brokerPath) hook \(hookArguments)\(hookArguments.isEmpty ? "" : " ")-- \"$@\""
        let script = """
            #!/bin/sh
            # kvmi-broker's libvirt hook, installed by `kvmi-broker install-hook`. It only talks to the broker.
            exec \(command)

            """
        guard FileManager.default.createFile(atPath: path, contents: Data(script.utf8), attributes: [.posixPermissions: 0o755]) else {
            FileHandle.standardError.write(Data("kvmi-broker install-hook: cannot write \(escapedForLog(path))\n".utf8))
            throw ExitCode(1)
        }
        print("installed \(path), which runs: \(command)")
        print("restart libvirtd for it to take effect")
    }
}
