import Dispatch
import KVMIBrokerCore
import Logging
import ServiceLifecycle
import UnixSignals

#if canImport(Glibc)
    import Glibc
#endif

/// One part of the daemon (a server's accept loop, the libvirt watcher's event log) as a
/// swift-service-lifecycle `Service`: a graceful shutdown cancels it, which is how the parts
/// stop (the accept loops end, close their listeners and remove their sockets; sessions end
/// without a word to QEMU, so hooked guests stay hooked).
public struct DaemonPart: Service, CustomStringConvertible {
    public let description: String
    private let body: @Sendable () async -> Void

    public init(_ name: String, _ body: @escaping @Sendable () async -> Void) {
        description = name
        self.body = body
    }

    public func run() async throws {
        await cancelWhenGracefulShutdown { await body() }
    }
}

/// SIGHUP as a service: one reload at a time between RELOADING=1 and READY=1, hangups that
/// arrive during a reload coalesced into one more.
///
/// `onListening` is called once SIGHUP is trapped: `UnixSignalsSequence`'s initialiser returns
/// only after libdispatch has run each source's registration handler, that is after the signal
/// handler is installed, and a signal that arrives before the sequence is iterated is buffered
/// by its stream. `ServiceGroup.run` traps its shutdown signals (SIGTERM, SIGINT) the same way
/// before it starts any service, so when `onListening` runs every signal the broker handles is
/// handled: the daemon sends READY=1 from there.
public struct ReloadService: Service, CustomStringConvertible {
    public var description: String { "reload on SIGHUP" }
    private let logger: Logger
    private let notifier: ServiceNotifier?
    private let onListening: @Sendable () -> Void
    private let reload: @Sendable () async -> Void

    public init(
        logger: Logger, notifier: ServiceNotifier?, onListening: @escaping @Sendable () -> Void, reload: @escaping @Sendable () async -> Void
    ) {
        self.logger = logger
        self.notifier = notifier
        self.onListening = onListening
        self.reload = reload
    }

    public func run() async throws {
        let hangups = await UnixSignalsSequence(trapping: .sighup)
        onListening()
        let (requests, request) = AsyncStream.makeStream(of: Void.self, bufferingPolicy: .bufferingNewest(1))
        let logger = self.logger
        let notifier = self.notifier
        let reload = self.reload
        await cancelWhenGracefulShutdown {
            await withDiscardingTaskGroup { group in
                group.addTask {
                    for await _ in hangups {
                        logger.notice("SIGHUP: reloading the policy")
                        request.yield()
                    }
                    request.finish()
                }
                group.addTask {
                    for await _ in requests {
                        notifier?.reloading()
                        await reload()
                        notifier?.ready()
                    }
                }
                // Both loops end when a graceful shutdown cancels the service (an AsyncStream
                // ends its iteration on cancellation); a reload under way finishes first.
            }
        }
    }
}

/// The first part to stop: on a graceful shutdown (SIGTERM, SIGINT) it sends STOPPING=1, says so
/// in the log and arms the stop's bound: if the other parts have not stopped `stopTimeout`
/// later, the broker logs it and exits with status 1 anyway (from a dispatch thread, so a
/// blocked cooperative pool cannot hold it). Hooked guests stay hooked either way: QEMU holds
/// their state and reconnects to the next broker.
public struct StopService: Service, CustomStringConvertible {
    public var description: String { "stop" }
    private let logger: Logger
    private let notifier: ServiceNotifier?
    private let stopTimeout: Duration

    public init(logger: Logger, notifier: ServiceNotifier?, stopTimeout: Duration) {
        self.logger = logger
        self.notifier = notifier
        self.stopTimeout = stopTimeout
    }

    public func run() async throws {
        // Cancelled instead (another part failed): the group is ending anyway.
        guard (try? await gracefulShutdown()) != nil else { return }
        notifier?.stopping()
        let seconds = stopTimeout.secondsDouble
        let shown = stopTimeout.humanReadable
        let logger = self.logger
        // Armed before anything is logged: a notice waits for room when the log writer's queue is
        // full (stderr nobody drains), and the bound must hold even then.
        DispatchQueue.global().asyncAfter(deadline: .now() + seconds) {
            // Logged from another thread, so that a full log queue cannot keep the exit from happening.
            DispatchQueue.global().async {
                logger.error("the stop took longer than --stop-timeout (\(shown)); exiting now (hooked guests stay hooked)")
            }
            LogWriter.shared.flush(timeout: .seconds(1))
            exit(1)
        }
        logger.notice("stopping: the sockets close; hooked guests stay hooked", metadata: ["stop-timeout": "\(shown)"])
    }
}
