import ArgumentParser
import Foundation
import KVMIBrokerCore
import KVMITestIntrospector

#if canImport(Glibc)
    import Glibc
#endif

/// Test equipment: an introspection tool's side of the handshake, as libkvmi does it.
struct TestIntrospectorCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvmi-test-introspector",
        abstract: "A test introspector: listens, reads QEMU's handshake with libkvmi's rules and answers with the cookie hash.",
        discussion: """
            Behaviours (--mode): normal, silent, slow (one byte per second), size=N (announce struct_size N), \
            long=N (a valid reply with N extra bytes), wrong-cookie, close-mid-reply, flood (1 MiB after the reply).
            This is test equipment, not an introspector.
            """)

    @Option(help: "Where to listen: unix:/path or tcp:ADDRESS:PORT.")
    var listen: String

    @Option(help: "The shared secret file; its exact bytes' SHA-1 is the cookie.")
    var secretFile: String?

    @Option(help: "How to behave (see below).")
    var mode: String = "normal"

    @Flag(help: "Send a KVMI_GET_VERSION message right behind the reply, in the same write, as libkvmi does.")
    var sendGetVersion = false

    func run() throws {
        guard let behaviour = TestIntrospector.Behaviour(parsing: mode) else {
            throw ValidationError("unknown --mode '\(mode)'")
        }
        let endpoint = try IntrospectorEndpoint(parsing: listen)
        let secret = try secretFile.map { path -> [UInt8] in
            guard let data = FileManager.default.contents(atPath: path) else {
                throw ValidationError("cannot read --secret-file \(path)")
            }
            return Array(data)
        }
        let introspector = try TestIntrospector(
            .init(endpoint: endpoint, secret: secret, behaviour: behaviour, sendsFirstMessage: sendGetVersion))
        emit("test introspector listening on \(introspector.endpoint) (\(behaviour))")
        var seen = 0
        while true {
            let records = introspector.waitForRecords(seen + 1, timeout: .seconds(3600))
            for record in records.dropFirst(seen) {
                if let handshake = record.handshake {
                    let gpa = handshake.maxGPA.map { String(format: " max_gpa=0x%llx", $0) } ?? ""
                    emit(
                        "handshake: \(handshake.structSize) bytes, uuid=\(handshake.uuid) name=\"\(handshake.name)\" start_time=\(handshake.startTime)\(gpa); replied \(record.bytesReplied) bytes"
                    )
                } else {
                    emit("connection failed: \(record.error ?? "unknown")")
                }
            }
            seen = records.count
        }
    }
}

/// Unbuffered line output, so a supervising test sees each line at once.
func emit(_ line: String) {
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

TestIntrospectorCommand.main()
