import Foundation
import KVMIBrokerCore
import KVMIBrokerPolicy

/// A policy root in a temporary directory, removed when the value goes away.
final class TemporaryRoot {
    let path: String

    init() {
        var template = Array("/tmp/kvmi-policy-test-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        precondition(made != nil, "mkdtemp failed")
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        for directory in ["introspectors.d", "guests.d"] { mkdir(path + "/" + directory, 0o755) }
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// Writes `text` at `relative` (for example `guests.d/10-a.conf`) with `mode`.
    @discardableResult
    func write(_ relative: String, _ text: String, mode: mode_t = 0o644) -> String {
        let file = path + "/" + relative
        _ = FileManager.default.createFile(atPath: file, contents: Data(text.utf8))
        chmod(file, mode)
        return file
    }

    func write(_ relative: String, bytes: Data) {
        _ = FileManager.default.createFile(atPath: path + "/" + relative, contents: bytes)
        chmod(path + "/" + relative, 0o644)
    }
}

let acmeIntrospectors = """
    [introspector acme]
    Endpoint=unix:/run/acme/kvmi.sock
    ABI=v12
    SecretFile=/etc/kvmi-broker/secrets/acme.key

    [introspector other]
    Endpoint=vsock:3:4321
    ABI=v12
    SecretFile=/etc/kvmi-broker/secrets/other.key

    [introspector legacy]
    Endpoint=vsock:4:1234
    ABI=v7
    SecretFile=/etc/kvmi-broker/secrets/legacy.key

    """

/// Compiles in-memory files, failing the test with every diagnostic if they do not load.
func compiled(_ guests: String, introspectors: String = acmeIntrospectors, extra: [(String, String)] = []) throws -> (Policy, [PolicyDiagnostic]) {
    do {
        return try Policy.compile(files: [("introspectors.d/10-i.conf", introspectors), ("guests.d/50-g.conf", guests)] + extra)
    } catch {
        throw PolicyTestFailure(text: error.description)
    }
}

struct PolicyTestFailure: Error, CustomStringConvertible {
    var text: String
    var description: String { text }
}

func guest(_ uuid: String = "00000000-0000-0000-0000-000000000001", _ name: String, _ metadata: GuestMetadata? = nil) -> GuestFacts {
    GuestFacts(uuid: GuestUUID(uuid)!, name: name, metadata: metadata)
}
