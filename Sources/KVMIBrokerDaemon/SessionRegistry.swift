import Foundation
import KVMIBrokerCore

/// One guest's session as the status view shows it.
public struct SessionStatus: Sendable, Codable, Equatable {
    public var uuid: String
    public var name: String
    public var qemuPID: Int32
    public var state: String
    public var hooked: Bool
    public var failures: Int
    public var lastFailure: String?
    public var startTime: Int64
    public var since: Date
    /// From the trigger (HELLO, resume, reset, ...) to QEMU's HOOK success, for the last hook.
    public var lastHookMicroseconds: Int64?
    /// Of that: from the HOOK request to QEMU's RESULT (QEMU's ioctls and its main loop).
    public var lastHookRequestMicroseconds: Int64?
    /// Hooks completed by this session.
    public var hooks: Int = 0
}

/// Sessions keyed by guest UUID: at most one live channel per guest, and the status view.
public actor SessionRegistry {
    private var sessions: [GuestUUID: (token: UInt64, status: SessionStatus)] = [:]
    private var listeners: [UInt64: @Sendable () -> Void] = [:]
    private var nextToken: UInt64 = 1
    private let statusFile: String?
    private let writer = DispatchQueue(label: "kvmi-broker.status-writer")

    public init(statusFile: String?) {
        self.statusFile = statusFile
    }

    /// Claims the guest for a new channel. A live session of the same QEMU pid is replaced
    /// (QEMU reconnected before the broker noticed); another pid's is refused.
    public func claim(_ uuid: GuestUUID, status: SessionStatus) -> UInt64? {
        if let existing = sessions[uuid], existing.status.qemuPID != status.qemuPID { return nil }
        let token = nextToken
        nextToken += 1
        sessions[uuid] = (token, status)
        persist()
        return token
    }

    public func update(_ uuid: GuestUUID, token: UInt64, _ change: (inout SessionStatus) -> Void) {
        guard var entry = sessions[uuid], entry.token == token else { return }
        change(&entry.status)
        sessions[uuid] = entry
        persist()
    }

    /// `notify` is called on every policy reload while the session lives.
    public func listen(token: UInt64, _ notify: @escaping @Sendable () -> Void) {
        listeners[token] = notify
    }

    /// Tells every live session that the policy changed; each re-decides from one snapshot.
    public func broadcastPolicyChange() {
        for notify in listeners.values { notify() }
    }

    public func release(_ uuid: GuestUUID, token: UInt64) {
        listeners[token] = nil
        guard sessions[uuid]?.token == token else { return }
        sessions[uuid] = nil
        persist()
    }

    public func snapshot() -> [SessionStatus] {
        sessions.values.map(\.status).sorted { $0.name < $1.name || ($0.name == $1.name && $0.uuid < $1.uuid) }
    }

    private func persist() {
        guard let statusFile else { return }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        guard let data = try? encoder.encode(snapshot()) else { return }
        // Written off the cooperative pool, atomically (write a temporary file, then rename).
        writer.async {
            let temporary = statusFile + ".tmp"
            if FileManager.default.createFile(atPath: temporary, contents: data, attributes: [.posixPermissions: 0o640]) {
                _ = rename(temporary, statusFile)
            }
        }
    }
}
