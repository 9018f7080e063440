import CKVMIBroker
import KVMIBrokerCore
import Logging

#if canImport(Glibc)
    import Glibc
#endif

/// Accepts connections on a non-blocking listener until the task is cancelled, each handled in
/// its own child task (no thread per connection), then closes the listener. Accept failures
/// other than "nothing pending" (EMFILE, ENFILE, ...) are logged and retried after a pause, so
/// they cannot spin.
public func serveConnections(
    on listener: Descriptor, io: AsyncSocketIO, logger: Logger, what: String, _ handle: @escaping @Sendable (Descriptor) async -> Void
) async {
    await withDiscardingTaskGroup { group in
        while !Task.isCancelled {
            let raw = kvmib_accept(listener.raw, 1)
            if raw >= 0 {
                let connection = Descriptor(adopting: raw)
                group.addTask {
                    await handle(connection)
                    connection.close()
                }
                continue
            }
            let error = errno
            switch error {
            case EAGAIN:
                do {
                    _ = try await io.reactor.wait(for: .readable, on: listener.raw, until: .now.advanced(by: .seconds(3600)))
                } catch let error as BrokerError where error.code == .timedOut {
                    continue
                } catch {
                    break
                }
            case EINTR, ECONNABORTED:
                continue
            default:
                logger.error("accept failed on the \(what) socket", metadata: ["errno": "\(errnoName(error))"])
                try? await Task.sleep(for: .milliseconds(100))
            }
        }
    }
    listener.close()
}
