import ArgumentParser
import Dispatch
import Foundation
import KVMIBrokerCore
import KVMIBrokerDaemon
import KVMIBrokerOS
import KVMIBrokerPolicy
import Logging
import Metrics
import ServiceLifecycle

#if canImport(Glibc)
    import Glibc
#endif

/// `kvmi-broker run`: the daemon.
struct RunCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Run the broker: accept QEMU's channel, handshake with the introspector and have QEMU hook the guest.",
        discussion: """
            Policy mode (the default): the allow-policy under the --policy-root roots (default /usr/lib/kvmi-broker, \
            then /etc/kvmi-broker) decides every guest; SIGHUP reloads it (a policy with errors is refused and the \
            loaded one stays). Static mode (--introspector, for tests and bring-up): one introspector for every guest \
            (or the --guest list) with numeric allow-lists; --commands and --events must be given (there is no \
            allow-all default). Options of one mode are refused in the other.

            A QEMU's HELLO is accepted only if libvirt (--libvirt-uri) runs that domain with that QEMU pid and \
            emulator. The broker logs to the journal with fields when systemd connects its stderr to the journal \
            (JOURNAL_STREAM), else to stderr; decisions, hooks, unhooks, releases and reloads are audit records \
            (journal identifier kvmi-broker-audit, "audit:" on stderr). A failure that repeats (libvirt unreachable, an introspector \
            unreachable, the status file unwritable) is logged when it starts or changes, summarised while it \
            lasts, and logged once when it recovers. `kvmi-broker status` asks the broker over the control socket \
            (root, and members of --control-group); a status file is written only with --status-file (at start and \
            within 100 ms of every change). SIGTERM or SIGINT stops the broker; hooked guests stay hooked, and QEMU \
            reconnects to the next broker, which reconciles them with its policy without hooking them twice. \
            Metrics (Prometheus text exposition, GET /metrics) are served only with --metrics-socket or --metrics-listen.

            Every option can also be set in the configuration file (--config, default /etc/kvmi-broker/broker.conf; \
            a missing default file is no settings): a GLib key file with one [broker] section and the options' long \
            names as keys (channel-socket=/run/kvmi-broker/qemu.sock; repeatable options as ;-separated lists; flags \
            as true or false). Options on the command line override the file. A file with an error (an unknown key, a \
            key given twice, another section, a value the option refuses) is refused at start with file:line and exit \
            status 2. The file is read at start only: SIGHUP reloads the policy, not the file.
            """)

    @Option(
        help: ArgumentHelp(
            "The daemon's configuration file (default \(BrokerConfigFile.defaultPath), which may be missing; a file named here must exist).",
            valueName: "path"))
    var config: String?

    @Option(name: .customLong("channel-socket"), help: "The channel socket QEMU connects to (default \(BrokerDefaults.channelSocket)).")
    var channelSocketOption: String?
    var channelSocket: String { channelSocketOption ?? BrokerDefaults.channelSocket }

    @Option(
        name: .customLong("libvirt-uri"),
        help:
            "libvirt URI (default \(BrokerDefaults.libvirtURI)): a HELLO is accepted only if libvirt runs that domain with that QEMU pid; empty disables the check (with --insecure-no-libvirt-identity)."
    )
    var libvirtUriOption: String?
    var libvirtUri: String { libvirtUriOption ?? BrokerDefaults.libvirtURI }

    @Flag(
        help: """
            Run without libvirt's pid-to-domain check (with --libvirt-uri ''): a QEMU is then trusted on /proc alone (its \
            executable and -uuid), which a local process can imitate. For tests and hosts without libvirt only.
            """)
    var insecureNoLibvirtIdentity = false

    @Option(
        name: .customLong("control-socket"),
        help: "The control socket the libvirt hook and `kvmi-broker status` talk to (default \(BrokerDefaults.controlSocket)); empty disables it.")
    var controlSocketOption: String?
    var controlSocket: String { controlSocketOption ?? BrokerDefaults.controlSocket }

    @Option(
        help:
            "Group whose members may read the status on the control socket (mode 0660); default root only (0600). The hook's operations stay root's."
    )
    var controlGroup: String?

    @Option(help: "Group allowed to connect to the channel socket (mode 0660); default root only (0600).")
    var socketGroup: String?

    @Option(help: "Static mode: the introspector endpoint (unix:/path, vsock:CID:PORT or tcp:ADDRESS:PORT). Without it the policy decides.")
    var introspector: String?

    @Option(name: .customLong("policy-root"), help: "Policy mode: a root with introspectors.d/ and guests.d/ (repeatable; later roots override).")
    var policyRoots: [String] = []

    @Flag(help: "Policy mode: accept policy files not owned by root (tests, unprivileged runs).")
    var allowNonRootOwner = false

    @Option(help: "Static mode: shared secret file (cookie = SHA-1 of its exact bytes).")
    var secretFile: String?

    @Option(help: "Static mode: ABI generation of this host's kernel: v7 or v12 (default v12).")
    var abi: String?

    @Option(help: "Static mode, required: allowed command ids: all, none, or a comma-separated list.")
    var commands: String?

    @Option(
        help: "Static mode, required: allowed event ids: all, none, or a comma-separated list (include 0, the unhook event, for graceful unhooks).")
    var events: String?

    @Option(name: .customLong("guest"), help: "Static mode: introspect only this guest UUID (repeatable); default every guest that connects.")
    var guests: [String] = []

    @Option(
        name: .customLong("status-file"),
        help:
            "Also write the broker's pid and version and each session's state to this file as JSON (for monitoring that reads files, and to see after a crash what the broker held; `kvmi-broker status --status-file`); default none."
    )
    var statusFileOption: String?
    var statusFile: String { statusFileOption ?? "" }

    @Option(help: "Static mode: first retry delay, seconds (default 0.5; the policy sets BackoffInitial= per introspector).")
    var backoffInitial: Double?

    @Option(help: "Static mode: longest retry delay, seconds (default 30).")
    var backoffMax: Double?

    @Option(help: "Static mode: seconds for connect + handshake with the introspector (default 10).")
    var handshakeTimeout: Double?

    @Option(
        name: .customLong("emulator"),
        help: """
            With --insecure-no-libvirt-identity, required: an executable a QEMU may run (repeatable; compared by file, not by \
            name). With libvirt, a QEMU must run the <emulator> libvirt records for its domain instead.
            """)
    var emulators: [String] = []

    @Option(
        name: .customLong("handshakes-per-introspector"),
        help:
            "Handshakes in flight to one introspector at once (default \(BrokerDefaults.handshakesPerIntrospector), at most 4096); the rest wait their turn in arrival order."
    )
    var handshakesPerIntrospectorOption: Int?
    var handshakesPerIntrospector: Int { handshakesPerIntrospectorOption ?? BrokerDefaults.handshakesPerIntrospector }

    @Option(help: "Serve Prometheus metrics (GET /metrics) on this unix socket (mode 0600, or 0660 with --metrics-group). Off by default.")
    var metricsSocket: String?

    @Option(help: "Group allowed to connect to the --metrics-socket (mode 0660); default root only (0600).")
    var metricsGroup: String?

    @Option(
        help:
            "Serve Prometheus metrics (GET /metrics) on this loopback ADDRESS:PORT, such as 127.0.0.1:9465 or [::1]:9465; other addresses are refused (no authentication). Off by default."
    )
    var metricsListen: String?

    @Option(name: .customLong("log-level"), help: "Log level: trace, debug, info, notice, warning, error (default \(BrokerDefaults.logLevel)).")
    var logLevelOption: String?
    var logLevel: String { logLevelOption ?? BrokerDefaults.logLevel }

    @Option(
        help:
            "Seconds a stop (SIGTERM, SIGINT) may take (default 10): past it the broker logs so and exits with status 1 anyway. Hooked guests stay hooked either way."
    )
    var stopTimeout: Double?

    /// Options only policy mode reads, and options only static mode reads, that were given.
    var policyModeOptions: [String] {
        (policyRoots.isEmpty ? [] : ["--policy-root"]) + (allowNonRootOwner ? ["--allow-non-root-owner"] : [])
    }

    var staticModeOptions: [String] {
        let given: [(String, Bool)] = [
            ("--secret-file", secretFile != nil), ("--abi", abi != nil), ("--commands", commands != nil), ("--events", events != nil),
            ("--guest", !guests.isEmpty), ("--backoff-initial", backoffInitial != nil), ("--backoff-max", backoffMax != nil),
            ("--handshake-timeout", handshakeTimeout != nil),
        ]
        return given.filter(\.1).map(\.0)
    }

    mutating func validate() throws {
        try applyConfigurationFile()
        for (key, value) in [
            ("stop-timeout", stopTimeout.map { "\($0)" }), ("handshakes-per-introspector", handshakesPerIntrospectorOption.map { "\($0)" }),
        ] {
            if let value, let problem = Self.valueProblem(key, [value]) { throw ValidationError("--\(key) \(problem)") }
        }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level '\(escapedForLog(logLevel))' is not a level") }
        if let controlGroup {
            guard !controlSocket.isEmpty else {
                throw ValidationError("--control-group applies to the control socket, which --control-socket '' disables")
            }
            guard getgrnam(controlGroup) != nil else { throw ValidationError("--control-group '\(escapedForLog(controlGroup))' is not a group") }
        }
        if libvirtUri.isEmpty != insecureNoLibvirtIdentity {
            throw ValidationError(
                insecureNoLibvirtIdentity
                    ? "--insecure-no-libvirt-identity needs --libvirt-uri '' (the check is on whenever a libvirt URI is given)"
                    : "--libvirt-uri '' turns off libvirt's pid-to-domain check, the one sound proof of which guest a QEMU is; add --insecure-no-libvirt-identity to do that on purpose"
            )
        }
        if introspector != nil {
            let wrong = policyModeOptions
            guard wrong.isEmpty else {
                throw ValidationError(
                    "\(wrong.joined(separator: ", ")) \(wrong.count == 1 ? "is a policy-mode option" : "are policy-mode options"); static mode (--introspector) does not read the policy: drop \(wrong.count == 1 ? "it" : "them") or drop --introspector"
                )
            }
            let missing = [("--commands", commands), ("--events", events)].filter { $0.1 == nil }.map(\.0)
            guard missing.isEmpty else {
                throw ValidationError(
                    "static mode (--introspector) needs \(missing.joined(separator: " and ")) given explicitly: there is no allow-all default (write 'all' to allow everything, 'none' for the kernel's defaults, or ids like 2,4,6)"
                )
            }
        } else {
            let wrong = staticModeOptions
            guard wrong.isEmpty else {
                throw ValidationError(
                    "\(wrong.joined(separator: ", ")) \(wrong.count == 1 ? "is a static-mode option" : "are static-mode options") (with --introspector); in policy mode the policy's [introspector] sections decide that: drop \(wrong.count == 1 ? "it" : "them") or add --introspector"
                )
            }
        }
        if insecureNoLibvirtIdentity && emulators.isEmpty {
            throw ValidationError(
                "--insecure-no-libvirt-identity needs --emulator PATH: without libvirt's <emulator>, only the executables listed are accepted as QEMU (a name such as qemu-system-* proves nothing)"
            )
        }
        if !insecureNoLibvirtIdentity && !emulators.isEmpty {
            throw ValidationError(
                "--emulator applies only with --insecure-no-libvirt-identity: with libvirt, a QEMU must run the <emulator> libvirt records for its domain"
            )
        }
        for emulator in emulators where !FileManager.default.isExecutableFile(atPath: emulator) {
            throw ValidationError("--emulator '\(escapedForLog(emulator))' is not an executable file")
        }
        if let abi, ABIGeneration(parsing: abi) == nil { throw ValidationError("--abi must be v7 or v12, not '\(escapedForLog(abi))'") }
        for uuid in guests where GuestUUID(uuid) == nil { throw ValidationError("--guest '\(escapedForLog(uuid))' is not a UUID") }
        if let handshakeTimeout, !(handshakeTimeout > 0 && handshakeTimeout <= 3600) {
            throw ValidationError("--handshake-timeout must be more than 0 and at most 3600 seconds")
        }
        for (option, value) in [("--backoff-initial", backoffInitial), ("--backoff-max", backoffMax)] {
            if let value, !(value > 0 && value <= 3600) { throw ValidationError("\(option) must be more than 0 and at most 3600 seconds") }
        }
    }

    /// Reads broker.conf (--config, or the default path if it exists) and takes each option the
    /// command line did not give from it. A bad file is refused with `file:line: what is wrong`
    /// on stderr and exit status 2, before anything is bound or started.
    private mutating func applyConfigurationFile() throws {
        let path = config ?? BrokerConfigFile.defaultPath
        let settings: [String: BrokerConfigFile.Setting]
        do {
            settings = try BrokerConfigFile.load(path: path, required: config != nil)
            for setting in settings.values.sorted(by: { $0.line < $1.line }) {
                if let problem = Self.valueProblem(setting.key, setting.values) {
                    throw BrokerConfigFile.Problem(path: path, line: setting.line, message: "\(setting.key) \(problem)")
                }
            }
        } catch {
            FileHandle.standardError.write(Data("kvmi-broker run: \(error)\n".utf8))
            throw ExitCode(2)
        }
        for setting in settings.values {
            let value = setting.value
            switch setting.key {
            case "channel-socket": channelSocketOption = channelSocketOption ?? value
            case "libvirt-uri": libvirtUriOption = libvirtUriOption ?? value
            case "insecure-no-libvirt-identity": insecureNoLibvirtIdentity = insecureNoLibvirtIdentity || setting.flag
            case "control-socket": controlSocketOption = controlSocketOption ?? value
            case "control-group": controlGroup = controlGroup ?? value
            case "socket-group": socketGroup = socketGroup ?? value
            case "introspector": introspector = introspector ?? value
            case "policy-root": policyRoots = policyRoots.isEmpty ? setting.values : policyRoots
            case "allow-non-root-owner": allowNonRootOwner = allowNonRootOwner || setting.flag
            case "secret-file": secretFile = secretFile ?? value
            case "abi": abi = abi ?? value
            case "commands": commands = commands ?? value
            case "events": events = events ?? value
            case "guest": guests = guests.isEmpty ? setting.values : guests
            case "status-file": statusFileOption = statusFileOption ?? value
            case "backoff-initial": backoffInitial = backoffInitial ?? Double(value)
            case "backoff-max": backoffMax = backoffMax ?? Double(value)
            case "handshake-timeout": handshakeTimeout = handshakeTimeout ?? Double(value)
            case "emulator": emulators = emulators.isEmpty ? setting.values : emulators
            case "handshakes-per-introspector": handshakesPerIntrospectorOption = handshakesPerIntrospectorOption ?? Int(value)
            case "metrics-socket": metricsSocket = metricsSocket ?? value
            case "metrics-group": metricsGroup = metricsGroup ?? value
            case "metrics-listen": metricsListen = metricsListen ?? value
            case "log-level": logLevelOption = logLevelOption ?? value
            case "stop-timeout": stopTimeout = stopTimeout ?? Double(value)
            default: preconditionFailure("broker.conf key \(setting.key) has no option")
            }
        }
    }

    /// What is wrong with `values` for the option `key` on its own (nil: nothing), worded to
    /// follow the option's name: "'loud' is not a level". The command line's checks and
    /// broker.conf's use it; what depends on several options is `validate()`'s.
    static func valueProblem(_ key: String, _ values: [String]) -> String? {
        for value in values {
            let shown = escapedForLog(value, limit: 64)
            switch key {
            case "log-level":
                if Logger.Level(rawValue: value) == nil { return "'\(shown)' is not a level" }
            case "control-group", "socket-group", "metrics-group":
                if getgrnam(value) == nil { return "'\(shown)' is not a group" }
            case "abi":
                if ABIGeneration(parsing: value) == nil { return "must be v7 or v12, not '\(shown)'" }
            case "guest":
                if GuestUUID(value) == nil { return "'\(shown)' is not a UUID" }
            case "emulator":
                if !FileManager.default.isExecutableFile(atPath: value) { return "'\(shown)' is not an executable file" }
            case "handshake-timeout", "backoff-initial", "backoff-max", "stop-timeout":
                if let seconds = Double(value), !(seconds > 0 && seconds <= 3600) { return "must be more than 0 and at most 3600 seconds" }
            case "handshakes-per-introspector":
                if let number = Int(value), !(1...4096).contains(number) { return "must be from 1 to 4096" }
            case "introspector":
                do { _ = try Self.staticEndpoint(value) } catch { return "'\(shown)': \(error.message)" }
            case "commands", "events":
                do { _ = try ids(value, "--" + key) } catch {
                    return error.message.hasPrefix("--\(key): ") ? String(error.message.dropFirst("--\(key): ".count)) : error.message
                }
            case "metrics-listen":
                do { _ = try MetricsServer.loopbackEndpoint(parsing: value) } catch {
                    return error.message.hasPrefix("--metrics-listen ") ? String(error.message.dropFirst("--metrics-listen ".count)) : error.message
                }
            default:
                break
            }
        }
        return nil
    }

    /// Where to serve metrics (nil: off). Throws one sentence for the command line.
    func metricsAddress() throws(BrokerError) -> MetricsServer.Address? {
        if metricsSocket != nil && metricsListen != nil {
            throw BrokerError(.invalidArgument, "--metrics-socket and --metrics-listen: give one of them")
        }
        if metricsGroup != nil && metricsSocket == nil {
            throw BrokerError(.invalidArgument, "--metrics-group applies only with --metrics-socket")
        }
        if let metricsListen { return .tcp(try MetricsServer.loopbackEndpoint(parsing: metricsListen)) }
        guard let metricsSocket else { return nil }
        var group: UInt32?
        if let metricsGroup {
            guard let entry = getgrnam(metricsGroup) else {
                throw BrokerError(.invalidArgument, "--metrics-group '\(escapedForLog(metricsGroup, limit: 64))' is not a group")
            }
            group = entry.pointee.gr_gid
        }
        return .unix(path: metricsSocket, group: group)
    }

    func run() async throws {
        let metricsAddress: MetricsServer.Address?
        do {
            metricsAddress = try self.metricsAddress()
        } catch {
            FileHandle.standardError.write(Data("kvmi-broker run: \(error.message)\n".utf8))
            throw ExitCode(2)
        }
        let level = Logger.Level(rawValue: logLevel)!
        // Before any thread formats a time (setenv is not safe against concurrent getenv).
        if let zone = BrokerLog.timeZoneSetting(current: ProcessInfo.processInfo.environment["TZ"]) { setenv("TZ", zone, 1) }
        // Under systemd (JOURNAL_STREAM names our stderr) the journal, natively; else stderr.
        let journal = BrokerLog.stderrIsJournal()
        LoggingSystem.bootstrap { label in BrokerLog.handler(label: label, level: level, journal: journal) }
        // Records are written on the log writer's queue: write what is queued before exiting.
        defer { BrokerLog.flush() }
        let logger = Logger(label: "kvmi-broker")
        // Hundreds of guests need more than the usual 1,024 descriptors: take what the hard limit allows.
        let limit = raiseDescriptorLimit()
        // Room for thousands of descriptors now: growing the table while guests connect stalls
        // every thread that opens one for an RCU grace period, each time it doubles.
        if !reserveDescriptorTable() {
            let error = errno
            logger.debug("cannot grow the descriptor table in advance", metadata: ["errno": "\(errnoName(error))"])
        }
        if limit.soft < 4096 {
            logger.warning(
                "the descriptor limit is \(limit.soft) (hard \(limit.hard)): at most \(ConnectionAdmission(descriptorLimit: limit.soft).maximumConnections) guests can be connected at once; raise LimitNOFILE"
            )
        }
        var configuration: BrokerConfiguration
        do {
            configuration = try makeConfiguration()
        } catch let error as PolicyLoadError {
            for diagnostic in error.diagnostics { FileHandle.standardError.write(Data("kvmi-broker run: policy: \(diagnostic)\n".utf8)) }
            throw ExitCode(2)
        } catch {
            FileHandle.standardError.write(Data("kvmi-broker run: \(error)\n".utf8))
            throw ExitCode(2)
        }
        signal(SIGPIPE, SIG_IGN)
        // A hangup before the reloader traps SIGHUP is ignored, not fatal (READY=1 is not sent yet).
        signal(SIGHUP, SIG_IGN)
        let notifier = ServiceNotifier(generation: configuration.policy?.snapshot.generation, logger: logger)
        configuration.notifier = notifier
        var metrics: BrokerMetrics?
        if metricsAddress != nil {
            // Once per process, here: the broker's own metrics take their factory explicitly
            // (BrokerMetrics), so in-process tests never bootstrap.
            let brokerMetrics = BrokerMetrics()
            MetricsSystem.bootstrap(brokerMetrics.factory)
            if let generation = configuration.policy?.snapshot.generation { brokerMetrics.policy(generation: generation) }
            configuration.metrics = brokerMetrics
            metrics = brokerMetrics
        }
        var libvirtTask: Task<Void, Never>?
        if libvirtUri.isEmpty {
            logger.warning(
                "IDENTITY CHECK OFF (--insecure-no-libvirt-identity): QEMUs are trusted on /proc alone (executable and -uuid), which a local process can imitate"
            )
            let perGuest = (configuration.policy?.snapshot.policy.introspectors.values.filter(\.endpoint.isPerGuest) ?? []).map(\.name).sorted()
            if !perGuest.isEmpty {
                logger.warning(
                    "introspector\(perGuest.count == 1 ? "" : "s") \(perGuest.joined(separator: ", ")) \(perGuest.count == 1 ? "has a" : "have") per-guest endpoint ({uuid}, {name}), expanded only from the identity libvirt verifies: their guests are not introspected (required ones fail closed)"
                )
            }
        } else {
            let (identity, task) = LibvirtIdentity.start(uri: libvirtUri, logger: logger)
            configuration.identity = identity
            libvirtTask = task
        }
        defer { libvirtTask?.cancel() }
        configuration.handshakesPerIntrospector = handshakesPerIntrospector
        let server = ChannelServer(configuration: configuration, logger: logger)
        let listener: Descriptor
        do {
            listener = try server.bind()
        } catch {
            FileHandle.standardError.write(Data("kvmi-broker run: \(error)\n".utf8))
            throw ExitCode(1)
        }
        var control: (ControlServer, Descriptor)?
        if !controlSocket.isEmpty {
            var readers: (gid: gid_t, name: String)?
            if let controlGroup {
                guard let entry = getgrnam(controlGroup) else {
                    FileHandle.standardError.write(Data("kvmi-broker run: --control-group '\(escapedForLog(controlGroup))' is not a group\n".utf8))
                    throw ExitCode(2)
                }
                readers = (entry.pointee.gr_gid, controlGroup)
            }
            var connected: (@Sendable () -> Bool)?
            if let watcher = (configuration.identity as? LibvirtIdentity)?.watcher {
                connected = { watcher.connectedNow }
            }
            let staticIntrospector: String? = configuration.policy == nil ? "\(configuration.introspector)" : nil
            let status = LiveStatusSource(
                registry: server.registry, policy: configuration.policy, staticIntrospector: staticIntrospector,
                libvirtURI: libvirtUri.isEmpty ? nil : libvirtUri, libvirtConnected: connected, controlGroup: controlGroup,
                drains: configuration.drains)
            let controlServer = ControlServer(
                path: controlSocket, plans: configuration.plans, logger: logger, status: status, readers: readers,
                metrics: metrics, drains: configuration.drains, libvirtIdentity: configuration.identity != nil)
            do {
                control = (controlServer, try controlServer.bind())
            } catch {
                FileHandle.standardError.write(Data("kvmi-broker run: control socket: \(error)\n".utf8))
                throw ExitCode(1)
            }
        }
        var metricsServing: (MetricsServer, Descriptor)?
        if let metricsAddress, let metrics {
            let metricsServer = MetricsServer(address: metricsAddress, metrics: metrics, sessions: server.registry, logger: logger)
            do {
                metricsServing = (metricsServer, try metricsServer.bind())
            } catch {
                FileHandle.standardError.write(Data("kvmi-broker run: metrics: \(error)\n".utf8))
                throw ExitCode(1)
            }
        }
        // The daemon's parts as services of one ServiceGroup (swift-service-lifecycle): SIGTERM
        // and SIGINT shut it down gracefully, in reverse order: `StopService` first (STOPPING=1,
        // the bound armed), then the reloader, the servers (each stops accepting, ends its
        // sessions without unhooking anyone and removes its socket), libvirt last.
        var parts: [any Service] = []
        if let libvirtTask {
            parts.append(
                DaemonPart("libvirt watcher") {
                    await withTaskCancellationHandler {
                        await libvirtTask.value
                    } onCancel: {
                        libvirtTask.cancel()
                    }
                })
        }
        parts.append(DaemonPart("channel server") { await server.run(listener: listener) })
        if let (controlServer, controlListener) = control {
            parts.append(DaemonPart("control server") { await controlServer.run(listener: controlListener) })
        }
        if let (metricsServer, metricsListener) = metricsServing {
            parts.append(DaemonPart("metrics server") { await metricsServer.run(listener: metricsListener) })
        }
        parts.append(
            ReloadService(
                logger: logger, notifier: notifier,
                onListening: {
                    // The sockets listen (connections wait in the backlog until accepted), discovery
                    // has started, and SIGTERM/SIGINT (trapped by the group before any service
                    // starts) and SIGHUP (trapped just now) are handled from here on, not lost.
                    notifier.ready()
                    logger.notice("ready: the sockets listen; SIGHUP reloads the policy, SIGTERM stops")
                },
                reload: { await server.reloadPolicy() }))
        let bound = Duration.milliseconds(Int64((stopTimeout ?? BrokerDefaults.stopTimeout) * 1000))
        parts.append(StopService(logger: logger, notifier: notifier, stopTimeout: bound))
        var groupConfiguration = ServiceGroupConfiguration(
            services: parts.map { .init(service: $0) }, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger)
        // Half-way to the bound the group cancels every part still running (in order until then);
        // at the bound StopService's own timer exits if even that has not ended the process.
        groupConfiguration.maximumGracefulShutdownDuration = bound / 2
        do {
            try await ServiceGroup(configuration: groupConfiguration).run()
        } catch {
            logger.error("stopped on a failure: \(escapedForLog("\(error)", limit: 256))")
            throw ExitCode(1)
        }
        logger.notice("stopped")
    }

    private func makeConfiguration() throws -> BrokerConfiguration {
        var group: UInt32?
        if let socketGroup {
            guard let entry = getgrnam(socketGroup) else { throw BrokerError(.invalidArgument, "--socket-group '\(socketGroup)' is not a group") }
            group = entry.pointee.gr_gid
        }
        guard let introspector else {
            let sources = PolicySources(
                roots: policyRoots.isEmpty ? PolicySources.defaultRoots : policyRoots, requireRootOwnership: !allowNonRootOwner)
            let store = try PolicyStore(sources: sources)
            return BrokerConfiguration(
                channelSocketPath: channelSocket, channelSocketGroup: group, policy: store, verifier: PeerVerifier(emulators: emulators),
                statusFile: statusFile.isEmpty ? nil : statusFile)
        }
        let generation = ABIGeneration(parsing: abi ?? BrokerDefaults.abi)!
        let endpoint = try Self.staticEndpoint(introspector)
        var cookie: CookieHash?
        if let secretFile { cookie = CookieHash(secret: try SecretFile.load(secretFile)) }
        // validate() makes both explicit in static mode.
        let lists = try Channel.AllowLists(
            abi: generation, commands: try Self.ids(commands ?? "none", "--commands"), events: try Self.ids(events ?? "none", "--events"))
        return BrokerConfiguration(
            channelSocketPath: channelSocket, channelSocketGroup: group, introspector: endpoint, cookie: cookie, allowLists: lists,
            guests: guests.isEmpty ? nil : Set(guests.compactMap(GuestUUID.init)),
            backoff: try Backoff(
                initial: .milliseconds(Int64((backoffInitial ?? BrokerDefaults.backoffInitial) * 1000)),
                maximum: .milliseconds(Int64((backoffMax ?? BrokerDefaults.backoffMax) * 1000)),
                multiplier: 2, jitter: 0.2),
            handshakeTimeout: .milliseconds(Int64((handshakeTimeout ?? BrokerDefaults.handshakeTimeout) * 1000)),
            verifier: PeerVerifier(emulators: emulators), statusFile: statusFile.isEmpty ? nil : statusFile)
    }

    /// `--introspector`: one endpoint for every guest. Placeholders are refused rather than
    /// taken as literal braces: per-guest endpoints are a policy feature (`Endpoint=`).
    private static func staticEndpoint(_ text: String) throws(BrokerError) -> IntrospectorEndpoint {
        let template = try EndpointTemplate(parsing: text)
        guard let fixed = template.fixed else {
            throw BrokerError(
                .invalidEndpoint,
                "per-guest endpoints ({uuid}, {name}) are expanded only in policy mode (Endpoint= in introspectors.d), not with --introspector")
        }
        return fixed
    }

    private static func ids(_ text: String, _ option: String) throws(BrokerError) -> [Int32] {
        switch text {
        case "all": return [-1]
        case "none": return []
        default:
            var result: [Int32] = []
            for part in text.split(separator: ",") {
                guard let id = Int32(part.trimmingCharacters(in: .whitespaces)), id >= 0 else {
                    throw BrokerError(
                        .invalidArgument, "\(option): '\(escapedForLog(String(part), limit: 64))' is not an id (use all, none, or numbers like 2,4,6)"
                    )
                }
                result.append(id)
            }
            return result
        }
    }
}
